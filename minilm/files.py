"""Writing a file so that a reader never sees half of it: write beside it, then rename over it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to a hidden temporary file in ``path``'s folder, then rename it over ``path``.

    The rename is atomic on POSIX and Windows file systems, so a crash leaves the old file or the
    new one, never a torn one. The temporary name carries the process id, so two writers never share it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
