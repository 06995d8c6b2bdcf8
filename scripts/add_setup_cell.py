"""Give every lesson its Colab setup cell, and the README and teaching guide their "Open in Colab" badges.

    python scripts/add_setup_cell.py              # notebooks/*.ipynb, README.md, docs/teaching.md
    python scripts/add_setup_cell.py notebooks/02_attention.ipynb --no-docs
    python scripts/add_setup_cell.py --no-notebooks   # only the badges
    python scripts/add_setup_cell.py --check      # exit 1 if anything is missing or out of date

Idempotent: a notebook that already has the cell (found by its first line,
``minilm.colab.SETUP_MARKER``) gets it updated in place, otherwise it is inserted as the first
code cell (after the title). Other cells are left exactly as they are; the cell has no output in
a checkout, so the notebook need not be re-executed for nbval. The badges go between the
``<!-- colab badges -->`` markers (one line per notebooks/*.ipynb, titled by the notebook's
first heading). Everything comes from ``minilm.colab``, whose address is pyproject.toml's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's minilm, even when another one is installed

from minilm import colab  # noqa: E402

DOCS = (ROOT / "README.md", ROOT / "docs" / "teaching.md")
BEGIN = "<!-- colab badges: written by scripts/add_setup_cell.py; edit there, not here -->"
END = "<!-- end colab badges -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), flags=re.S)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def with_setup_cell(nb: dict, source: str | None = None) -> dict:
    """``nb`` (a notebook as JSON) with the setup cell present and current; other cells untouched."""
    source = colab.setup_cell_source() if source is None else source
    cells = [c for c in nb["cells"] if not (c["cell_type"] == "code" and _source(c).startswith(colab.SETUP_MARKER))]
    existing = [c for c in nb["cells"] if c not in cells]
    cell = existing[0] if existing else {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": []}
    cell = {**cell, "source": source.splitlines(keepends=True)}  # a list of lines, as nbformat stores it
    if nb.get("nbformat", 4) > 4 or nb.get("nbformat_minor", 0) >= 5:
        cell["id"] = cell.get("id", colab.SETUP_CELL_ID)  # nbformat 4.5 wants an id on every cell
    first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    return {**nb, "cells": [*cells[:first_code], cell, *cells[first_code:]]}


def _dump(nb: dict) -> str:
    # The layout nbformat.write uses, so a notebook the script leaves unchanged is byte-identical.
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def update_notebook(path: Path, write: bool = True) -> bool:
    """Insert or refresh the setup cell of one notebook; True if the file changed (or, unwritten, would)."""
    text = path.read_text(encoding="utf-8")
    new = _dump(with_setup_cell(json.loads(text)))
    if write and new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def lesson_title(path: Path) -> str:
    """The notebook's first Markdown heading (e.g. '1 · Attention from scratch'), or its file name."""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            m = re.search(r"^#+\s+(.+)$", _source(cell), flags=re.M)
            if m:
                return m.group(1).strip()
    return path.stem


def badge_block(notebooks: list[Path], doc: Path) -> str:
    """The Markdown between the markers: one badge line per lesson, linking to the lesson from ``doc``."""
    lines = [BEGIN, "", "Open a lesson in Google Colab (its first cell installs minilm there):", ""]
    for nb in notebooks:
        relative = Path("..", "notebooks", nb.name) if doc.parent.name == "docs" else Path("notebooks", nb.name)
        lines.append(f"- {colab.badge_markdown(nb.name)} [{lesson_title(nb)}]({relative.as_posix()})")
    return "\n".join([*lines, "", END])


def updated_doc(doc: Path, notebooks: list[Path]) -> str:
    """``doc``'s text with its badge block regenerated; a ValueError if it has no markers."""
    text = doc.read_text(encoding="utf-8")
    if not _BLOCK.search(text):
        raise ValueError(f"{doc}: no badge block; add the two lines\n{BEGIN}\n{END}\nwhere the badges go")
    return _BLOCK.sub(lambda _: badge_block(notebooks, doc), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--no-docs", action="store_true", help="leave README.md and docs/teaching.md alone")
    parser.add_argument("--no-notebooks", action="store_true", help="only the badges in README.md and docs/teaching.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if something is out of date")
    ns = parser.parse_args(argv)
    notebooks = [] if ns.no_notebooks else ns.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    stale = []
    for path in notebooks:
        if update_notebook(path, write=not ns.check):
            stale.append(str(path))
    if not ns.no_docs:
        lessons = sorted((ROOT / "notebooks").glob("*.ipynb"))
        for doc in DOCS:
            new = updated_doc(doc, lessons)
            if new != doc.read_text(encoding="utf-8"):
                stale.append(str(doc))
                if not ns.check:
                    doc.write_text(new, encoding="utf-8")
    verb = "out of date" if ns.check else "updated"
    print(f"{verb}: {', '.join(stale)}" if stale else "everything is current")
    return 1 if ns.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
