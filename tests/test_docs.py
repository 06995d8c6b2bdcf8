"""The docs cannot go stale: the config reference is regenerated, and marked commands run.

Convention for fenced code blocks in ``docs/**/*.md`` and ``README.md``: every ```` ```bash ````,
```` ```shell ```` or ```` ```python ```` block carries an HTML comment (invisible on the code
host) on the line before it:

* ``<!-- runnable -->`` — the test runs it, as written, from the root of a scratch copy of
  the repository (``<!-- runnable timeout=300 -->`` raises the default 120 s limit). Blocks of
  one page run in order in the same copy, so a page can train, then sample from the result.
  Python blocks run as a script in a subprocess; shell blocks under ``bash -euo pipefail``.
* ``<!-- slow: why -->`` — a complete command, correct as written, that the test does not run
  (a full training run, a GPU or a second node, an install). The reason is required.
* ``<!-- fragment: why -->`` — not a complete program (part of a longer example).

A block with no marker fails the test, so a new command cannot slip in untested by accident.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
CODE_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
DEFAULT_TIMEOUT = 120
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "outputs",
    "__pycache__",
    ".ipynb_checkpoints",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    ".venv",
    "venv",
    "student",
    "submissions",
)

MARKER = re.compile(r"^<!--\s*(runnable|slow|fragment)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)[^`]*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str | None  # runnable / slow / fragment / None (unmarked)
    detail: str  # the reason, or "timeout=N"

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def timeout(self) -> int:
        m = re.search(r"timeout=(\d+)", self.detail)
        return int(m.group(1)) if m else DEFAULT_TIMEOUT


def extract_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the marker comment before it (if any)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith(ticks):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mk = MARKER.match(lines[k].strip()) if k >= 0 else None
        blocks.append(
            Block(
                path=path,
                line=i + 1,
                lang=lang,
                code="\n".join(lines[i + 1 : j]) + "\n",
                kind=mk.group(1) if mk else None,
                detail=mk.group(2).lstrip(":").strip() if mk else "",
            )
        )
        i = j + 1
    return blocks


def code_blocks(path: Path) -> list[Block]:
    return [b for b in extract_blocks(path) if b.lang in CODE_LANGS]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------
# Config reference
# ----------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_up_to_date():
    gen = _generator()
    current = (ROOT / "docs" / "config-reference.md").read_text()
    assert current == gen.render(), (
        "docs/config-reference.md differs from the Config dataclass: run python scripts/gen_config_reference.py"
    )


def test_config_reference_documents_every_field():
    from minilm.config import FIELDS

    text = (ROOT / "docs" / "config-reference.md").read_text()
    for name, f in FIELDS.items():
        assert re.search(rf"^\| `{name}` \|", text, flags=re.M), f"field {name!r} has no row"
        assert f.metadata["help"] in text.replace("\\|", "|")


def test_a_new_field_changes_the_reference(monkeypatch):
    """A field added to the dataclass without regenerating the page makes the page stale."""
    import dataclasses
    import typing

    import minilm.config as config

    @dataclasses.dataclass(frozen=True)  # Config is frozen: a subclass must be too
    class Grown(config.Config):
        brand_new_field: int = config._f(3, "training", "A field nobody documented yet.", minimum=0)

    monkeypatch.setattr(config, "_HINTS", typing.get_type_hints(Grown))
    fields = {f.name: f for f in dataclasses.fields(Grown)}
    rendered = _generator().render(fields)
    assert "| `brand_new_field` | int | `3` | an integer >= 0 | A field nobody documented yet. |" in rendered
    assert rendered != (ROOT / "docs" / "config-reference.md").read_text()


def test_interactions_name_real_fields():
    from minilm.config import FIELDS

    gen = _generator()
    for title, names, _ in gen.INTERACTIONS:
        assert set(names) <= set(FIELDS), title


# ----------------------------------------------------------------------------------------
# Runnable code blocks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_every_code_block_is_marked(path):
    unmarked = [b.where for b in code_blocks(path) if b.kind is None]
    assert not unmarked, (
        "code blocks without a <!-- runnable -->, <!-- slow: why --> or <!-- fragment: why --> marker: "
        + ", ".join(unmarked)
    )
    no_reason = [b.where for b in code_blocks(path) if b.kind in ("slow", "fragment") and not b.detail]
    assert not no_reason, "slow/fragment markers need a reason: " + ", ".join(no_reason)


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory):
    """A copy of the repository, so commands can write outputs/ without touching the checkout."""
    dest = tmp_path_factory.mktemp("docs") / "minilm"
    shutil.copytree(ROOT, dest, ignore=COPY_IGNORE, symlinks=True)
    return dest


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "MPLBACKEND": "Agg",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
        # One thread per process: on a shared or busy machine, OpenMP threads that wait for each
        # other make small CPU ops many times slower. Commands run as written either way.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # `jupyter trust` writes its signature database here, not into the user's home.
        "JUPYTER_DATA_DIR": str(cwd / ".jupyter-data"),
    }
    if block.lang in ("python", "py"):
        script = cwd / f"_docs_block_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        # `python` in a command means the interpreter running the tests.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        code = "\n".join(line[2:] if line.startswith("$ ") else line for line in block.code.splitlines())
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=block.timeout)


@pytest.mark.parametrize("path", [p for p in DOCS if any(b.kind == "runnable" for b in code_blocks(p))], ids=_id)
def test_runnable_blocks_run(path, scratch_root, tmp_path):
    # Each page gets its own copy, so pages cannot depend on each other's outputs.
    cwd = tmp_path / "repo"
    shutil.copytree(scratch_root, cwd, symlinks=True)
    not_run = []
    for block in code_blocks(path):
        if block.kind != "runnable":
            not_run.append(f"{block.where} ({block.kind}: {block.detail})")
            continue
        t0 = time.perf_counter()
        try:
            r = run_block(block, cwd)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where}: ran past {block.timeout}s:\n{block.code}")
        assert r.returncode == 0, (
            f"{block.where} failed (exit {r.returncode}):\n{block.code}\n--- stdout\n{r.stdout[-3000:]}"
            f"\n--- stderr\n{r.stderr[-3000:]}"
        )
        print(f"{block.where}: {time.perf_counter() - t0:.1f} s")
    if not_run:
        print("not run (marked):\n  " + "\n  ".join(not_run))


# ----------------------------------------------------------------------------------------
# README's table of counted parameters
# ----------------------------------------------------------------------------------------
def test_readme_parameter_table_matches_the_library():
    import warnings

    from minilm.config import load_config
    from minilm.counting import count_parameters

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)\.json` \|(.*)$", text, flags=re.M)
    assert {n for n, _ in rows} == {p.stem for p in (ROOT / "configs" / "training").glob("*.json")}
    for name, rest in rows:
        cells = [c.strip() for c in rest.strip().strip("|").split("|")]
        cfg = load_config(ROOT / "configs" / "training" / f"{name}.json")
        assert cells[:4] == [str(cfg.d_model), str(cfg.n_layers), str(cfg.n_heads), f"{cfg.vocab_size:,}"], name
        assert cells[4] == f"{count_parameters(cfg).total:,}", name
        original = ROOT / "configs" / "design_original" / f"{name}.json"
        if original.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                claimed = load_config(original).estimated_parameters
            from minilm.config import parse_count

            assert parse_count(cells[5]) == claimed, name
        else:
            assert cells[5] == "—", name


# ----------------------------------------------------------------------------------------
# Links between pages
# ----------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: " + ", ".join(broken)
