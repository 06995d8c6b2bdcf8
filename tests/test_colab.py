"""Colab-ready lessons: the setup cell, the script that writes it, the badges, the one address."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minilm import colab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import add_setup_cell  # noqa: E402


def _run_cell(monkeypatch, cwd: Path, importable: bool) -> list[list[str]]:
    """Execute the setup cell in ``cwd`` with pip stood in for; returns the commands it would run."""
    calls = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "minilm":
            return real_find_spec(name) if importable else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    exec(compile(colab.setup_cell_source(), "<setup cell>", "exec"), {})
    return calls


@pytest.mark.parametrize("importable", [True, False])
def test_setup_cell_does_nothing_inside_a_checkout(monkeypatch, capsys, importable):
    # From notebooks/, where nbval and JupyterLab run a lesson; even if minilm were not installed.
    assert _run_cell(monkeypatch, ROOT / "notebooks", importable) == []
    assert capsys.readouterr().out == ""  # nothing printed: the stored (empty) output stays valid for nbval


def test_setup_cell_installs_from_the_repository_outside_a_checkout(monkeypatch, tmp_path):
    calls = _run_cell(monkeypatch, tmp_path, importable=False)  # a fresh Colab kernel: /content, no minilm
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"minilm @ git+{colab.repository_url()}"]]


def test_setup_cell_does_not_reinstall_outside_a_checkout(monkeypatch, tmp_path):
    # The second lesson of a Colab session: minilm is already there.
    assert _run_cell(monkeypatch, tmp_path, importable=True) == []


def test_the_address_is_kept_once_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    (url,) = re.findall(r'^Repository\s*=\s*"([^"]+)"', text, flags=re.M)
    assert colab.repository_url() == url
    assert colab.colab_url("x.ipynb").startswith("https://colab.research.google.com/github/")
    assert colab.colab_url("x.ipynb").endswith("/blob/main/notebooks/x.ipynb")
    # No hand-written copy elsewhere in the library or scripts: they all call minilm.colab.
    for path in [*(ROOT / "minilm").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        assert url not in path.read_text(), path


def test_non_github_address_is_refused():
    with pytest.raises(ValueError, match="github.com"):
        colab.colab_url("x.ipynb", url="https://gitlab.com/a/b")


def test_script_inserts_the_cell_once_and_leaves_other_cells_alone(tmp_path):
    copies = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        copies.append(tmp_path / nb.name)
        shutil.copy(nb, copies[-1])
    before = {p: json.loads(p.read_text()) for p in copies}
    assert add_setup_cell.main([*map(str, copies), "--no-docs"]) == 0
    first = {p: p.read_text() for p in copies}
    for path in copies:
        nb = json.loads(first[path])
        old_cells = [c for c in before[path]["cells"] if not "".join(c["source"]).startswith(colab.SETUP_MARKER)]
        setup = [c for c in nb["cells"] if "".join(c["source"]).startswith(colab.SETUP_MARKER)]
        assert (
            len(setup) == 1 and setup[0]["outputs"] == [] and "".join(setup[0]["source"]) == colab.setup_cell_source()
        )
        assert [c for c in nb["cells"] if c is not setup[0]] == old_cells  # every other cell as it was
        first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert first_code is setup[0]
        assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])  # ids stay unique
    # Idempotent: a second run changes no byte, and --check agrees.
    assert add_setup_cell.main([*map(str, copies), "--no-docs"]) == 0
    assert {p: p.read_text() for p in copies} == first
    assert add_setup_cell.main([*map(str, copies), "--no-docs", "--check"]) == 0
    # A changed cell (say, a new address) is updated in place, not added twice.
    nb = json.loads(first[copies[0]])
    nb = add_setup_cell.with_setup_cell(nb, source=colab.setup_cell_source(url="https://github.com/someone/else"))
    cells = [c for c in nb["cells"] if "".join(c["source"]).startswith(colab.SETUP_MARKER)]
    assert len(cells) == 1 and "someone/else" in "".join(cells[0]["source"])


def test_check_mode_reports_a_notebook_without_the_cell(tmp_path):
    copy = tmp_path / "02_attention.ipynb"
    shutil.copy(ROOT / "notebooks" / "02_attention.ipynb", copy)
    if colab.SETUP_MARKER in copy.read_text():  # after the lead has run the script: strip the cell
        nb = json.loads(copy.read_text())
        nb["cells"] = [c for c in nb["cells"] if not "".join(c["source"]).startswith(colab.SETUP_MARKER)]
        copy.write_text(json.dumps(nb))
    before = copy.read_text()
    assert add_setup_cell.main([str(copy), "--no-docs", "--check"]) == 1
    assert copy.read_text() == before  # --check writes nothing


def test_readme_and_teaching_guide_have_a_current_badge_per_lesson():
    """Fails when a lesson is added, renamed or retitled: rerun scripts/add_setup_cell.py."""
    lessons = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for doc in add_setup_cell.DOCS:
        text = doc.read_text()
        assert text == add_setup_cell.updated_doc(doc, lessons), f"{doc}: rerun python scripts/add_setup_cell.py"
        for nb in lessons:
            assert colab.badge_markdown(nb.name) in text


def test_every_lesson_starts_with_the_current_setup_cell():
    assert add_setup_cell.main(["--no-docs", "--check"]) == 0
