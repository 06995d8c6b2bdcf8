"""Graded exercises: hidden cases behind a secret, the static check, near-miss hints, and a class graded end to end."""

import csv
import importlib.util
import inspect
import json
import math
from pathlib import Path

import nbformat
import pytest

from minilm import exercises, grading
from minilm.cli import main as cli_main
from minilm.counting import format_count

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "12_graded_exercises.ipynb"
SECRET = "0123456789abcdef" * 4
STUDENTS = ["ada", "bob", "cy", "dee", "student-017"]

spec = importlib.util.spec_from_file_location("make_student_version", ROOT / "scripts" / "make_student_version.py")
msv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(msv)


def solution_sources() -> dict[str, str]:
    """The instructor's solution cells of the graded notebook, by grade id."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return {
        c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")
    }


def reference_namespace() -> dict:
    """The instructor's solutions, run as plain Python beside the setup cell's GPU table."""
    from minilm.hardware import ACCELERATORS

    ns = {"math": math, "GPU_PEAK_BF16": {n: a.bf16 for n, a in ACCELERATORS.items() if a.bf16}}
    for src in solution_sources().values():
        exec(src, ns)
    return ns


def forms_of(x: float) -> list[str]:
    n = round(x)
    return [str(n), f"{n:,}", f"{n:_}", format_count(n), f"{x:.6g}"] if n > 99 else [f"{x:.6g}"]


# ---------------------------------------------------------------------------------------
# The notebook
# ---------------------------------------------------------------------------------------


def test_notebook_carries_nbgrader_metadata_for_every_exercise():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}
    assert len(cells) == sum("nbgrader" in c.metadata for c in nb.cells), "grade ids must be unique"
    for ex in grading.GRADED:
        solution, test = cells[ex.key], cells[f"test_{ex.key}"]
        assert solution.metadata.nbgrader.solution and not solution.metadata.nbgrader.locked
        assert f"def {ex.key}(" in solution.source and "### BEGIN SOLUTION" in solution.source
        params = list(inspect.signature(reference_namespace()[ex.key]).parameters)
        assert tuple(params) == ex.params, f"{ex.key}: the notebook's arguments differ from the grader's"
        meta = test.metadata.nbgrader
        assert meta.grade and meta.locked and not meta.solution and meta.points == ex.points
        assert f"check({ex.key})" in test.source
        assert "### BEGIN HIDDEN TESTS" in test.source and "### END HIDDEN TESTS" in test.source
    points = sum(c.metadata.nbgrader.get("points", 0) for c in cells.values())
    assert points == grading.MAX_POINTS == 10
    setup = cells["setup"]
    assert setup.metadata.nbgrader.locked and "GPU_PEAK_BF16" in setup.source


def test_reference_solutions_match_the_library_on_every_students_hidden_cases():
    ns = reference_namespace()
    for sid in STUDENTS:
        for key, calls in grading.hidden_cases(sid, SECRET).items():
            for args in calls:
                ok, hint = grading.BY_KEY[key].feedback(ns[key](*args), args)
                assert ok, (sid, key, args, hint)


def test_public_examples_are_checked_with_hints_and_never_the_answer():
    ns = reference_namespace()
    for ex in grading.GRADED:
        assert grading.check(ns[ex.key]).startswith("✓")
        for args in ex.examples:
            expected = ex.reference(*args)
            nears = [(v, h) for v, h in ex.near_misses(*args) if not ex.is_right(v, expected)]
            for near, _ in nears:
                with pytest.raises(AssertionError) as err:
                    grading.check(lambda *a, v=near: v, [args], key=ex.key)
                # the first mistake that gives this value names it (two may coincide: K and V, 2 bytes)
                hint = next(h for v, h in nears if math.isclose(v, near, rel_tol=1e-12))
                assert hint in str(err.value)
                for form in forms_of(expected):
                    assert form not in str(err.value), f"{ex.key}: the hint leaks {form}"

    def count_parameters(*args):
        raise NotImplementedError

    with pytest.raises(AssertionError, match="not written yet"):
        grading.check(count_parameters)
    with pytest.raises(KeyError):
        grading.check(lambda: 0)


def test_known_mistakes_get_their_specific_hint():
    ns = reference_namespace()
    gpt2 = (50257, 768, 12, 1024, None, True, True)
    count = grading.BY_KEY["count_parameters"]
    assert "LayerNorm after the last block" in count.feedback(ns["count_parameters"](*gpt2) - 2 * 768, gpt2)[1]
    flops = grading.BY_KEY["flops_per_token"]
    args = (50257, 768, 12, 1024, None)
    assert "backward" in flops.feedback(ns["flops_per_token"](*args) // 3, args)[1]
    kv = grading.BY_KEY["kv_cache_bytes"]
    assert "AND values" in kv.feedback(12 * 768 * 2 * 1024, (12, 768, 1024, 1, 2))[1]
    optimal = grading.BY_KEY["compute_optimal_parameters"]
    assert "square root" in optimal.feedback(1e21 / 120, (1e21,))[1]
    hours = grading.BY_KEY["chinchilla_hours"]
    args = (124_439_808, "A100 80GB", 0.4, 1)
    assert "MFU" in hours.feedback(ns["chinchilla_hours"](*args) * 0.4, args)[1]
    assert "raised ZeroDivisionError" in hours.feedback({"error": "ZeroDivisionError: x"}, args)[1]
    assert "not a number" in hours.feedback("'soon'", args)[1]


# ---------------------------------------------------------------------------------------
# The secret
# ---------------------------------------------------------------------------------------


def test_hidden_cases_follow_from_the_secret_and_the_student():
    cases = grading.hidden_cases("ada", SECRET)
    assert cases == grading.hidden_cases("ada", SECRET)  # reproducible for the instructor
    assert cases != grading.hidden_cases("ada", SECRET[::-1])  # another secret, other configs
    assert cases != grading.hidden_cases("alan", SECRET)  # another student, other configs
    for key, calls in cases.items():
        assert len(set(calls)) == grading.CASES_PER_EXERCISE
        assert not set(calls) & set(grading.BY_KEY[key].examples)  # never a public example


@pytest.mark.parametrize("bad", [None, "", "   ", "short"])
def test_no_secret_no_cases(bad, monkeypatch):
    monkeypatch.delenv(grading.SECRET_ENV, raising=False)
    with pytest.raises(grading.SecretError):
        grading.hidden_cases("ada", bad)
    with pytest.raises(grading.SecretError):
        grading.answer_key("ada", bad)
    with pytest.raises(grading.SecretError):
        grading.load_secret()


def test_a_student_copy_cannot_obtain_an_answer_from_any_public_function(monkeypatch, tmp_path):
    """Call every public function of the classroom modules as a student could, without the secret:
    none returns one of the student's hidden expected values, or the cases they are computed on."""
    monkeypatch.delenv(grading.SECRET_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # whatever a function might write lands here
    key = grading.answer_key("ada", SECRET)
    hidden = {json.dumps(c["args"]) for calls in key.values() for c in calls}
    expected = [c["expected"] for calls in key.values() for c in calls]
    tried = 0
    for module in (grading, exercises):
        for name, fn in vars(module).items():
            if name.startswith("_") or not callable(fn) or getattr(fn, "__module__", "") != module.__name__:
                continue
            for args in (("ada",), ("ada", None), ("ada", "")):
                try:
                    out = fn(*args)
                except (Exception, SystemExit):  # most need more than an id, or refuse without a secret
                    continue
                tried += 1
                text = repr(out)
                for value in expected:
                    assert not any(form in text for form in forms_of(value)), f"{name}{args} gave an answer"
                assert not any(h in text.replace(" ", "") for h in hidden), f"{name}{args} gave a hidden case"
    assert tried >= 2  # some ran (e.g. exercises.for_student): the assertion above was exercised
    # What a submission's kernel receives: the hidden arguments, never an expected value.
    cell = grading.harness_source(grading.hidden_cases("ada", SECRET), "@@mark@@", 5)
    assert SECRET not in cell
    for value in expected:
        if value > 10_000:  # small floats may coincide with an argument's digits
            assert not any(form in cell for form in forms_of(value))


# ---------------------------------------------------------------------------------------
# The static check
# ---------------------------------------------------------------------------------------
OWN = "def count_parameters(V, d, L, P, d_ff=None, bias=True, tied=True):\n    return V * d\n"


@pytest.mark.parametrize(
    ("cells", "flagged"),
    [
        ([OWN], False),
        (["from minilm.hardware import peak_flops\nfrom minilm.config import Config\n", OWN], False),
        (["%matplotlib inline\nimport math\n", OWN], False),
        (["from minilm.counting import count_parameters\n"], True),  # imported, not written
        (["from minilm import counting\n", OWN.replace("V * d", "counting.count_parameters(V)")], True),
        (["import minilm.flops as mf\n", OWN.replace("V * d", "mf.flops_per_token(V)")], True),
        (["import minilm\n", OWN.replace("V * d", "minilm.counting.count_parameters(V)")], True),
        ([OWN.replace("V * d", "__import__('minilm.counting').counting.count_parameters(V)")], True),
        ([OWN.replace("V * d", "eval('V * d')")], True),
        (["from minilm.config import check_estimated_parameters as c\n", OWN.replace("V * d", "c(V)")], True),
        (
            [
                "from minilm.grading import ref_count_parameters as r\n",
                "def helper(*a):\n    return r(*a)\n",
                OWN.replace("V * d", "helper(V)"),
            ],
            True,
        ),
        (["from minilm.exercises import *\n", OWN], True),
        ([OWN, "globals()['count_parameters'] = lambda *a: 1\n"], True),  # replaced where no def shows it
        (["exec('def count_parameters(*a):\\n    return 1')\n"], True),
        ([], True),  # no definition at all
        (["%timeit 1 + 1\n", OWN], False),  # a magic is not an escape at top level
    ],
)
def test_static_check(cells, flagged):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    result = grading.static_check(nb, ["count_parameters"])
    assert ("count_parameters" in result) == flagged, result
    if flagged and cells:
        assert result["count_parameters"].startswith("not the student's work")
    if not cells:
        assert result["count_parameters"] == "count_parameters: no def in the notebook"


def test_the_lessons_colab_cell_is_skipped_only_while_unchanged():
    """Every lesson starts with the Colab set-up cell (importlib, sys): as written it is not the student's."""
    from minilm.colab import setup_cell_source

    setup = setup_cell_source()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (setup, OWN)])
    assert grading.static_check(nb, ["count_parameters"]) == {}
    tampered = setup + "\nimportlib.import_module('minilm.counting')\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (tampered, OWN)])
    assert "count_parameters" in grading.static_check(nb, ["count_parameters"])


def test_static_check_ignores_imports_the_function_does_not_use():
    cells = ["from minilm.grading import check\n", OWN, "check(count_parameters)\n"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    assert grading.static_check(nb, ["count_parameters"]) == {}


# ---------------------------------------------------------------------------------------
# The whole workflow: student version, a class of four, the gradebook
# ---------------------------------------------------------------------------------------


def submission(release, edits: dict[str, str]):
    """The released notebook with every solution cell filled in: the instructor's, or ``edits``."""
    sols = solution_sources()
    nb = nbformat.from_dict(release)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = edits.get(meta["grade_id"], sols[meta["grade_id"]])
    return nb


def test_a_class_of_four_is_graded_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing depends on running from the repository
    monkeypatch.delenv(grading.SECRET_ENV, raising=False)
    assert msv.main([str(NOTEBOOK), "--out", "release"]) == 0
    release = nbformat.read(tmp_path / "release" / NOTEBOOK.name, as_version=4)
    text = nbformat.writes(release)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "raise NotImplementedError()" in text

    sols = solution_sources()
    library = (
        "from minilm.counting import count_parameters as _count\nfrom minilm.config import Config\n\n"
        "def count_parameters(V, d, L, P, d_ff=None, bias=True, tied=True):\n"
        "    cfg = Config(vocab_size=V, d_model=d, n_heads=1, n_layers=L, max_seq_len=P, d_ff=d_ff, bias=bias,\n"
        "                 tie_embeddings=tied)\n"
        "    return _count(cfg).total\n"
    )
    near_miss = sols["kv_cache_bytes"].replace("2 * n_layers", "n_layers")  # keys only: half the cache
    assert near_miss != sols["kv_cache_bytes"]
    # never returns on the hidden configs (on the public examples it does, so the notebook itself runs)
    loops = sols["compute_optimal_parameters"].replace(
        "    ### BEGIN", "    while flops not in (1e21, 5.76e23):\n        pass\n    ### BEGIN"
    )
    assert loops != sols["compute_optimal_parameters"]
    folder = tmp_path / "submitted"  # nbgrader's layout: submitted/<student>/<assignment>/<notebook>
    for student, edits in {
        "ada": {},
        "bob": {"kv_cache_bytes": near_miss, "compute_optimal_parameters": loops},
        "cy": {"count_parameters": library},
    }.items():
        (folder / student / "ps12").mkdir(parents=True)
        nbformat.write(submission(release, edits), folder / student / "ps12" / NOTEBOOK.name)
    (folder / "dee" / "ps12").mkdir(parents=True)
    (folder / "dee" / "ps12" / NOTEBOOK.name).write_text(text[: len(text) // 2])  # cut off mid-file
    (tmp_path / "secret").write_text(SECRET + "\n")

    argv = ["grade", "submitted", "--out", "grades.csv", "--secret-file", "secret", "--answer-key", "key.json"]
    assert cli_main([*argv, "--timeout", "300", "--call-timeout", "2"]) == 0
    assert "4 submission(s) graded" in capsys.readouterr().out

    with open(tmp_path / "grades.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["ada", "bob", "cy", "dee"]
    assert list(rows["ada"])[1:7] == [ex.key for ex in grading.GRADED]
    full = {ex.key: str(ex.points) for ex in grading.GRADED}
    assert {k: rows["ada"][k] for k in full} == full and rows["ada"]["total"] == "10" and rows["ada"]["notes"] == ""
    assert {k: rows["bob"][k] for k in full} == {**full, "kv_cache_bytes": "0", "compute_optimal_parameters": "0"}
    assert "kv_cache_bytes: The cache keeps keys AND values." in rows["bob"]["notes"]
    assert "compute_optimal_parameters: raised TimeoutError: took longer than 2 s" in rows["bob"]["notes"]
    assert {k: rows["cy"][k] for k in full} == {**full, "count_parameters": "0"}
    assert "not the student's work: count_parameters uses" in rows["cy"]["notes"]
    assert "_count (from minilm.counting.count_parameters)" in rows["cy"]["notes"]
    assert rows["dee"]["total"] == "0" and "cannot read" in rows["dee"]["notes"] and "JSON" in rows["dee"]["notes"]
    assert all(r["max"] == "10" for r in rows.values())
    assert (tmp_path / "grades.png").stat().st_size > 10_000  # the summary plot

    key = json.loads((tmp_path / "key.json").read_text())
    assert sorted(key) == ["ada", "bob", "cy", "dee"]
    assert key["ada"] == json.loads(json.dumps(grading.answer_key("ada", SECRET)))


def test_grade_refuses_to_run_without_a_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(grading.SECRET_ENV, raising=False)
    (tmp_path / "ada").mkdir()
    with pytest.raises(SystemExit) as e:
        cli_main(["grade", str(tmp_path), "--out", str(tmp_path / "g.csv")])
    assert e.value.code == 2 and grading.SECRET_ENV in capsys.readouterr().err


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_folder_without_the_notebook_gets_a_row(tmp_path, jobs):
    for student in ("eve", "fay"):
        (tmp_path / student).mkdir()
        (tmp_path / student / "notes.txt").write_text("forgot to upload")
    rows = grading.grade_class(tmp_path, SECRET, jobs=jobs)
    assert [r.student for r in rows] == ["eve", "fay"]
    assert all(r.total == 0 and "no 12_graded_exercises.ipynb" in r.notes[0] for r in rows)


def test_a_notebook_past_its_time_limit_keeps_the_functions_it_defined(tmp_path):
    cells = [
        "def kv_cache_bytes(n_layers, d_model, seq_len, batch_size, bytes_per_value=2):\n"
        "    return 2 * n_layers * d_model * bytes_per_value * seq_len * batch_size\n",
        "import time\ntime.sleep(600)\n",
        "def count_parameters(*args):\n    return 1\n",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(nb, tmp_path / "eve.ipynb")
    row = grading.grade_notebook(tmp_path / "eve.ipynb", "eve", SECRET, timeout=8, call_limit=2)
    assert row.points["kv_cache_bytes"] == 1 and row.total == 1
    assert "cell 2 ran past the 8 s time limit" in row.notes[0]
    # cell 3 runs only if time is left after the interrupt (it depends on how fast the kernel started)
    assert row.seconds < 60
