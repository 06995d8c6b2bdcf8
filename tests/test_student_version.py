"""Student copies: solutions blanked, outputs gone, and the stripped notebook still runs."""

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_student_version", ROOT / "scripts" / "make_student_version.py")
msv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(msv)

EXERCISE_NOTEBOOK = ROOT / "notebooks" / "04_counting_parameters.ipynb"


def solution_lines(nb) -> list[str]:
    """The non-blank lines inside every solution block of ``nb``."""
    lines = []
    for cell in nb.cells:
        for m in re.finditer(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", cell.source, re.S):
            lines += [line.strip() for line in m.group(1).splitlines() if line.strip()]
    return lines


def test_strip_source_blanks_the_assigned_names():
    src = "x = 1\n### BEGIN SOLUTION\ntmp = 2\nanswer = tmp * x\n### END SOLUTION\ncheck(answer)\n"
    out, n = msv.strip_source(src)
    assert n == 1
    assert out == "x = 1\nanswer = None  # YOUR ANSWER HERE\ncheck(answer)\n"


def test_strip_source_keeps_indentation_and_handles_other_blocks():
    src = "def f():\n    ### BEGIN SOLUTION\n    return 3\n    ### END SOLUTION\n"
    assert msv.strip_source(src)[0] == "def f():\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
    assert msv.strip_source("### BEGIN SOLUTION\na, b = 1, 2\n### END SOLUTION")[0] == (
        "a = None  # YOUR ANSWER HERE\nb = None  # YOUR ANSWER HERE"
    )
    md = "Why?\n### BEGIN SOLUTION\nBecause the head is tied.\n### END SOLUTION\n"
    assert msv.strip_source(md, "markdown")[0] == "Why?\nYOUR ANSWER HERE\n"


def test_hidden_tests_are_removed_with_their_markers():
    src = "check(f)\n### BEGIN HIDDEN TESTS\ncheck(f, [(1, 2)])\n### END HIDDEN TESTS"
    assert msv.strip_source(src) == ("check(f)", 0)


@pytest.mark.parametrize(
    "src",
    [
        "### BEGIN SOLUTION\nanswer = 42\n",
        "answer = 42\n### END SOLUTION\n",
        "check(f)\n### BEGIN HIDDEN TESTS\ncheck(f, [(1, 2)])\n",
        "check(f)\n### END HIDDEN TESTS\n",
    ],
)
def test_unmatched_marker_is_refused(src):
    with pytest.raises(msv.MarkerError):
        msv.strip_source(src)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_student_copy_has_no_solutions_and_no_outputs(path):
    original = nbformat.read(path, as_version=4)
    secrets = solution_lines(original)
    if path == EXERCISE_NOTEBOOK:
        assert len(secrets) >= 5, "the exercise notebook should carry marked solutions"
    student, n = msv.strip_notebook(original)
    assert n == sum(len(re.findall(r"^[ \t]*### BEGIN SOLUTION", c.source, re.M)) for c in original.cells)
    text = nbformat.writes(student)
    assert not re.search(r"^[ \t]*### (BEGIN|END) (SOLUTION|HIDDEN TESTS)", text, re.M)
    for line in secrets:
        assert line not in text, f"solution line survived: {line}"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in student.cells if "outputs" in c)
    assert "widgets" not in student.metadata
    assert solution_lines(original) == secrets  # the instructor's copy is untouched


def test_script_writes_copies_and_refuses_to_overwrite_the_original(tmp_path):
    assert msv.main([str(EXERCISE_NOTEBOOK), "--out", str(tmp_path)]) == 0
    assert "BEGIN SOLUTION" not in (tmp_path / EXERCISE_NOTEBOOK.name).read_text()
    with pytest.raises(SystemExit):
        msv.main([str(EXERCISE_NOTEBOOK), "--out", str(EXERCISE_NOTEBOOK.parent)])


def test_stripped_notebook_runs_and_the_checkers_say_not_answered(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    student_dir = tmp_path / "anywhere" / "student"  # no configs/ beside it: the notebook finds them itself
    student_dir.mkdir(parents=True)
    nb, _ = msv.strip_notebook(nbformat.read(EXERCISE_NOTEBOOK, as_version=4))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(student_dir)}}).execute()

    outputs, checks = [], []  # checks: what a cell ending in ex.check(answer) displays
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
            outputs.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            if out.output_type == "execute_result" and ".check(answer_" in cell.source:
                checks.append(out.data["text/plain"])
    assert len(checks) == 5  # four per-student exercises and the design's claim
    assert all(o.startswith("⏳ Not answered yet") for o in checks), checks
    assert any("0/4" in o for o in outputs)  # the grade table of the blank answers


GRADED_NOTEBOOK = ROOT / "notebooks" / "12_graded_exercises.ipynb"


@pytest.mark.filterwarnings("ignore:Object of type <:Warning")  # nbgrader 0.9.6's gradebook under SQLAlchemy 2.1
def test_the_script_releases_what_nbgrader_releases_and_nbgrader_autogrades_it(tmp_path, monkeypatch):
    """nbgrader's generate_assignment accepts the graded notebook and writes, cell for cell, what
    make_student_version.py writes; its autograde scores a complete and an unfinished submission."""
    from nbgrader.api import Gradebook  # nbgrader is in the dev extras
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config as TraitletsConfig

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    course = tmp_path / "course"
    (course / "source" / "ps12").mkdir(parents=True)
    (course / "source" / "ps12" / GRADED_NOTEBOOK.name).write_bytes(GRADED_NOTEBOOK.read_bytes())
    config = TraitletsConfig()
    config.CourseDirectory.root = str(course)
    config.CourseDirectory.course_id = "minilm"
    config.ExecutePreprocessor.timeout = 300
    api = NbGraderAPI(config=config)
    result = api.generate_assignment("ps12", force=True)
    assert result["success"], result["log"]

    released = nbformat.read(course / "release" / "ps12" / GRADED_NOTEBOOK.name, as_version=4)
    ours, _ = msv.strip_notebook(nbformat.read(GRADED_NOTEBOOK, as_version=4))
    assert [c.source for c in ours.cells] == [c.source for c in released.cells]
    for mine, theirs in zip(ours.cells, released.cells, strict=True):
        for key in ("deletable", "editable"):
            assert mine.metadata.get(key) == theirs.metadata.get(key), (key, mine.metadata)

    solutions = [c.source for c in nbformat.read(GRADED_NOTEBOOK, as_version=4).cells]
    for student, complete in (("ada", True), ("bob", False)):
        nb = nbformat.from_dict(released)
        if complete:  # ada hands in the instructor's solutions; bob hands in the blank copy
            for cell, source in zip(nb.cells, solutions, strict=True):
                if cell.metadata.get("nbgrader", {}).get("solution"):
                    cell.source = source
        folder = course / "submitted" / student / "ps12"
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / GRADED_NOTEBOOK.name)
        result = api.autograde("ps12", student, force=True)
        assert result["success"], result["log"]
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        assert gb.find_submission("ps12", "ada").score == 10
        assert gb.find_submission("ps12", "bob").score == 0
