"""environment.yml (conda) and pyproject.toml (pip) must list the same packages."""

import os
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name
NOT_PACKAGES = {"python", "pip"}


def split(req: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return dict(split(r) for r in reqs)


def conda_requirements() -> dict[str, str]:
    # The file is simple enough to read without a YAML parser: "  - name>=version" items.
    reqs = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("\ndependencies:\n", 1)[1].splitlines():
        m = re.match(r"^  - ([^:#]+?)\s*(#.*)?$", line)
        if m:
            name, spec = split(m.group(1))
            name = CONDA_NAMES.get(name, name)
            if name not in NOT_PACKAGES:
                reqs[name] = spec
    return reqs


def test_environment_yml_matches_pyproject():
    assert conda_requirements() == pyproject_requirements()


def test_environment_installs_the_package_itself():
    assert "- -e ." in (ROOT / "environment.yml").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, "the README should have exactly one test command"
    assert test_commands[0].strip() in ci


def test_wheel_ships_configs_and_corpus_and_finds_them_from_any_folder(tmp_path):
    """Colab installs the package, not the checkout: configs and corpus must travel inside the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Build from a copy of what the wheel is made of, so no build/ or egg-info lands in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("minilm", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    # --no-build-isolation: build with this environment's setuptools, no download.
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*build, str(wheels)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("minilm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (ROOT / "configs").glob("*/*.json"):
        assert f"minilm/configs/{config.parent.name}/{config.name}" in names
    assert "minilm/data/shakespeare.txt.gz" in names
    # Every module of the checkout is in the wheel (pyproject lists the packages by hand).
    assert {f"minilm/{p.name}" for p in (ROOT / "minilm").glob("*.py")} <= names

    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    probe = (
        "import minilm, minilm.colab as u, minilm.config as c, minilm.data as d;"
        "print(minilm.__file__); print(c.config_path('tiny')); print(len(d.load_text('shakespeare')));"
        "print(u.repository_url())"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MINILM_CONFIGS"} | {"PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == str(target / "minilm" / "__init__.py")
    assert out[1] == str(target / "minilm" / "configs" / "training" / "tiny_model.json")
    assert int(out[2]) > 1_000_000  # the whole corpus, decompressed
    # The repository's address travels in the package metadata (no pyproject.toml there).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out[3] == project["urls"]["Repository"]
