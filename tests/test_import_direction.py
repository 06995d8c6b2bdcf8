"""Imports flow one way: formatting <- model <- analytics <- training <- classroom <- command line.

Function-level imports count too; only TYPE_CHECKING blocks are exempt.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minilm"

LAYERS = {
    # plain helpers every layer may use: how tables and durations are printed, how a file is written whole
    "formatting": {"formatting", "files"},
    # what a model is: its config, its shape's arithmetic (the config checks stated counts with it), its modules,
    # and how it generates text (GPT.generate wraps minilm.generation)
    "model": {"config", "counting", "aten_ops", "attention", "blocks", "loss", "model", "generation"},
    # what a model costs: FLOPs, memory, hardware peaks, the size planner
    "analytics": {"flops", "memory", "hardware", "sizing", "inference", "sharding"},
    # making and running one: data, precision, the step, the loop, checkpoints, measurement, the CLI
    "training": {
        "tokenizer",
        "data",
        "precision",
        "optim",
        "step",
        "measure",
        "measure_ranks",
        "sharded_checkpoint",
        "runs",
        "compile_policy",
        "graph_passes",
        "checkpoint",
        "resume",
        "distributed",
        "interrupts",
        "report",
        "trainer",
        "hf",
        "export",
    },
    # teaching with it
    "classroom": {"exercises", "widgets", "questions", "colab", "grading"},
    # the command line: `minilm train | sample | export | grade` dispatches to all of the above
    "command line": {"cli"},
}
RANK = {module: i for i, layer in enumerate(LAYERS.values()) for module in layer}


def minilm_imports(path: Path) -> set[str]:
    """The minilm modules ``path`` imports anywhere (top level or inside functions), bar TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minilm"):
            if node.module == "minilm":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minilm.")}
    return found


MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_every_module_has_a_layer():
    missing = [p.stem for p in MODULES if p.stem not in RANK]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_point_down_or_sideways(path):
    upward = sorted(m for m in minilm_imports(path) if m in RANK and RANK[m] > RANK[path.stem])
    assert not upward, f"minilm.{path.stem} ({list(LAYERS)[RANK[path.stem]]}) imports higher layers: {upward}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "memory.py"
    bad.write_text("def f():\n    from minilm.trainer import Trainer\n")
    assert "trainer" in minilm_imports(bad)


def test_importing_the_config_loads_neither_torch_nor_the_trainer():
    code = (
        "import sys, minilm.config; print(sorted(m for m in ('torch', 'minilm.trainer', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_still_offers_its_front_door():
    from minilm import GPT, Config, Trainer, TrainResult
    from minilm.model import GPT as ModelGPT
    from minilm.trainer import Trainer as TrainerClass

    assert GPT is ModelGPT and Trainer is TrainerClass and TrainResult.__name__ == "TrainResult"
    assert Config().d_model > 0
