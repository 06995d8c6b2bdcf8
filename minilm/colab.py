"""Lessons that open in Google Colab: the project's address, each notebook's setup cell, the badges.

The repository's address lives in one place, ``[project.urls] Repository`` in pyproject.toml
(installed packages carry it in their metadata). Everything else is derived from it here:

- :func:`setup_cell_source`: the code cell every lesson starts with. Inside a minilm checkout
  it does nothing (nbval and local JupyterLab run the checkout's code); anywhere else (Colab, a
  fresh kernel) it pip-installs minilm from the repository when it is not importable yet. The
  corpus and configs ship inside the package, so nothing else is fetched.
- :func:`colab_url` / :func:`badge_markdown`: "Open in Colab" links to a lesson on GitHub.

``scripts/add_setup_cell.py`` writes the cell into notebooks/*.ipynb and the badges into the
README and the teaching guide; rerun it after changing the address or adding a lesson.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
BRANCH = "main"  # the branch Colab opens lessons from
SETUP_MARKER = "# minilm setup (Colab or a fresh kernel)"  # first line of the cell: how the script finds it
SETUP_CELL_ID = "minilm-setup"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository_url() -> str:
    """The project's repository, e.g. ``https://github.com/OWNER/NAME``.

    Read from the checkout's pyproject.toml when there is one (the source of truth), else from
    the installed package's metadata (``Project-URL: Repository, ...``).
    """
    if PYPROJECT.is_file():
        # A regular expression, not tomllib: Python 3.10 has no tomllib.
        m = re.search(r'^Repository\s*=\s*"([^"]+)"', PYPROJECT.read_text(encoding="utf-8"), flags=re.M)
        if m:
            return m.group(1).rstrip("/")
    try:
        for entry in metadata.metadata("minilm").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() == "repository":
                return url.strip().rstrip("/")
    except metadata.PackageNotFoundError:
        pass
    raise RuntimeError(f"no [project.urls] Repository in {PYPROJECT} nor in the installed minilm's metadata")


def _github_path(url: str) -> str:
    m = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?", url)
    if m is None:
        raise ValueError(f"Colab opens notebooks from GitHub; the repository {url!r} is not a github.com address")
    return m.group(1)


def install_requirement(url: str | None = None) -> str:
    """The pip requirement that installs minilm from the repository (a direct reference)."""
    return f"minilm @ git+{url or repository_url()}"


def colab_url(notebook: str, url: str | None = None) -> str:
    """The address that opens ``notebooks/<notebook>`` (a file name) of the repository in Colab."""
    repo = _github_path(url or repository_url())
    return f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook}"


def badge_markdown(notebook: str, url: str | None = None) -> str:
    """An "Open in Colab" badge linking to the lesson (Markdown)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, url)})"


def setup_cell_source(url: str | None = None) -> str:
    """The first code cell of every lesson (see the module docstring); prints nothing in a checkout."""
    requirement = install_requirement(url)
    return f'''{SETUP_MARKER}: does nothing inside a minilm checkout;
# elsewhere it installs minilm (with its corpus and configs) unless it is already installed.
# Written by scripts/add_setup_cell.py from pyproject.toml: edit it there, not here.
import importlib.util
import pathlib
import subprocess
import sys

_cwd = pathlib.Path.cwd().resolve()
_in_checkout = any(
    (p / "pyproject.toml").is_file() and (p / "minilm" / "__init__.py").is_file() for p in (_cwd, *_cwd.parents)
)
if not _in_checkout and importlib.util.find_spec("minilm") is None:
    print("installing {requirement} ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{requirement}"], check=True)
    importlib.invalidate_caches()  # so this kernel sees the new package'''
