"""The benchmark scripts run end to end (on a shape small enough for a unit test) and report what they promise."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_train_throughput_reports_ratios_and_loss_curves(tmp_path, capsys):
    bench = load("train_throughput")
    argv = [
        "--configs",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--threads",
        "1",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--peak-size",
        "128",
    ]
    results = bench.main([*argv, "--curve-steps", "3", "--cache-dir", str(tmp_path)])
    tiny = results["tiny"]
    ours, hf = tiny["first_loss"]
    assert ours == pytest.approx(hf, abs=1e-4)  # same weights in both models: same loss before training
    assert set(tiny["ratios"]) == {"minilm fp32 / HF fp32", "minilm bf16 / HF fp32", "minilm bf16 / minilm fp32"}
    assert all(r > 0 and math.isfinite(r) for r in tiny["ratios"].values())
    assert len(tiny["curves"]["fp32"]) == len(tiny["curves"]["bf16"]) == 3
    out = capsys.readouterr().out
    assert "target >= 1.0x" in out and "target >= 2.0x" in out and "max |fp32 - bf16|" in out
