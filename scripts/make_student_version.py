"""Write student copies of the lesson notebooks: solutions blanked, outputs cleared.

Solutions are marked as in nbgrader::

    ### BEGIN SOLUTION
    answer_1 = 4 * d * d + 4 * d
    ### END SOLUTION
    my[0].check(answer_1)

Each marked block is replaced by a blank the student fills in: one
``name = None  # YOUR ANSWER HERE`` line for each name the block's last statement
assigns (so the rest of the notebook still runs, and the checker answers "not answered
yet"), or ``# YOUR CODE HERE`` when the block ends otherwise. In markdown cells the block
becomes "YOUR ANSWER HERE". Every output, execution count and stored widget state is
removed, so no answer survives in an output either.

    python scripts/make_student_version.py                   # notebooks/*.ipynb -> student/
    python scripts/make_student_version.py notebooks/02_*.ipynb --out /tmp/class

The default output folder, ``student/``, sits next to ``notebooks/`` so the notebooks'
relative paths (``../configs``) still resolve.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION", re.M)
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[^\n]*\n(?P<body>.*?)^[ \t]*### END SOLUTION[^\n]*(?:\n|$)",
    re.M | re.S,
)


class MarkerError(ValueError):
    """A BEGIN without an END (or the reverse): refuse rather than leak a solution."""


def _assigned_names(code: str) -> list[str]:
    """Names bound by the last statement of ``code`` (empty if it is not an assignment)."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return []
    if not tree.body:
        return []
    last = tree.body[-1]
    targets: list[ast.expr] = []
    if isinstance(last, ast.Assign):
        targets = last.targets
    elif isinstance(last, (ast.AnnAssign, ast.AugAssign)):
        targets = [last.target]
    names: list[str] = []
    for t in targets:
        for node in ast.walk(t):
            if isinstance(node, ast.Name) and node.id not in names:
                names.append(node.id)
    return names


def strip_source(source: str, cell_type: str = "code") -> tuple[str, int]:
    """``source`` with every solution block blanked, and how many blocks there were."""

    def blank(m: re.Match) -> str:
        indent = m.group("indent")
        if cell_type != "code":
            return f"{indent}YOUR ANSWER HERE\n"
        names = _assigned_names(m.group("body"))
        if not names:
            return f"{indent}# YOUR CODE HERE\n"
        return "".join(f"{indent}{name} = None  # YOUR ANSWER HERE\n" for name in names)

    stripped, n = _BLOCK.subn(blank, source)
    if _MARKER.search(stripped):
        raise MarkerError(f"unmatched solution marker in:\n{source}")
    return stripped, n


def strip_notebook(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A student copy of ``nb`` (the input is not changed) and the number of blocks blanked."""
    nb = nbformat.from_dict(nb)  # deep copy
    total = 0
    for cell in nb.cells:
        cell.source, n = strip_source(cell.source, cell.cell_type)
        total += n
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "student", help="output folder (default: student/)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        nb, n = strip_notebook(nbformat.read(path, as_version=4))
        target = args.out / path.name
        if target.resolve() == path.resolve():
            raise SystemExit(f"refusing to overwrite the instructor's notebook {path}")
        nbformat.write(nb, target)
        print(f"{target}: {n} solution block(s) blanked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
