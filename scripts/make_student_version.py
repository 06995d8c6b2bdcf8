"""Write student copies of the lesson notebooks: solutions blanked, hidden tests removed, outputs cleared.

Solutions and hidden tests are marked as in nbgrader::

    def count_parameters(V, d, L, P, d_ff=None, bias=True, tied=True):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

    check(count_parameters)
    ### BEGIN HIDDEN TESTS
    check(count_parameters, [(32000, 512, 6, 512, 1536, False, False)])
    ### END HIDDEN TESTS

A solution block becomes what nbgrader's ``generate_assignment`` writes,
``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the block's indentation, with
one exception kept for the in-class practice exercises: a block whose last statement
assigns names becomes one ``name = None  # YOUR ANSWER HERE`` line per name (so the rest
of the notebook still runs, and the checker answers "not answered yet"). In markdown cells
a block becomes "YOUR ANSWER HERE". Hidden tests are removed with their markers. Cells
with nbgrader metadata become undeletable, and locked ones read-only, as nbgrader makes
them. Every output, execution count and stored widget state is removed, so no answer
survives in an output either. For the graded notebook the result is cell for cell what
``nbgrader generate_assignment`` releases (tests/test_student_version.py checks it).

    python scripts/make_student_version.py                   # notebooks/*.ipynb -> student/
    python scripts/make_student_version.py notebooks/12_graded_exercises.ipynb --out release/

The notebooks find the shipped configs with ``minilm.config.config_path``, so the copies
run from any folder.
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
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) (SOLUTION|HIDDEN TESTS)", re.M)
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's ClearSolutions.code_stub
TEXT_STUB = "YOUR ANSWER HERE"


class MarkerError(ValueError):
    """A BEGIN without an END (or the reverse): refuse rather than leak a solution or a hidden test."""


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
    """``source`` with every solution block blanked and every hidden test removed, and how many
    solution blocks there were. Works line by line, as nbgrader does."""
    out: list[str] = []
    block: list[str] | None = None  # the solution being skipped
    hidden = False
    n = indent = 0
    for line in source.split("\n"):
        marker = line.strip()
        if block is None and not hidden and marker.startswith("### BEGIN SOLUTION"):
            block, indent, n = [], len(line) - len(line.lstrip()), n + 1
        elif block is not None and marker.startswith("### END SOLUTION"):
            pad = line[:indent] if line[:indent].isspace() else " " * indent
            if cell_type != "code":
                out.append(pad + TEXT_STUB)
            else:
                names = _assigned_names("\n".join(block))
                stub = [f"{name} = None  # YOUR ANSWER HERE" for name in names] if names else list(CODE_STUB)
                out += [pad + s for s in stub]
            block = None
        elif block is None and not hidden and marker.startswith("### BEGIN HIDDEN TESTS"):
            hidden = True
        elif hidden and marker.startswith("### END HIDDEN TESTS"):
            hidden = False
        elif block is not None:
            block.append(line)
        elif not hidden:
            if _MARKER.match(line):
                raise MarkerError(f"unmatched marker {marker!r} in:\n{source}")
            out.append(line)
    if block is not None or hidden:
        raise MarkerError(f"a BEGIN marker without its END in:\n{source}")
    return "\n".join(out), n


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
        grader = cell.metadata.get("nbgrader", {})
        if grader.get("solution") or grader.get("grade") or grader.get("locked"):
            cell.metadata["deletable"] = False  # as nbgrader's LockCells: graded cells stay
        if grader.get("locked") and not grader.get("solution"):
            cell.metadata["editable"] = False
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
