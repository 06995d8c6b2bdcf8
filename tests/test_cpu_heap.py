"""minilm.step.keep_cpu_heap: freed CPU tensor memory stays in the heap, so a step's large
temporaries are reused instead of page-faulted in afresh (counted by the kernel, not timed)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilm import step

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose minilm is under test
FAULTS = """
import resource, sys
import torch
from minilm import step

def one():
    a = torch.empty(24 * 2**20).fill_(1.0)  # 96 MiB of fp32
    b = torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB
    del a, b

kept = step.keep_cpu_heap() if sys.argv[1] == "keep" else False
one()
one()  # the heap has grown to hold them
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_round(mode: str) -> tuple[bool, float]:
    """(kept, minor page faults per allocate-write-free of a 96 MiB and a 16 MiB tensor), in a fresh
    interpreter: the heap of this test process depends on the tests before it."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    kept, faults = out.split()
    return kept == "True", float(faults)


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_keep_cpu_heap_reuses_freed_blocks_without_page_faults():
    kept, faults = _faults_per_round("keep")
    assert kept and faults < 100
    # Without it, every round faults each 4 KiB page of both tensors in again (~28,000 faults).
    kept, faults = _faults_per_round("default")
    assert not kept and faults > 20_000


def test_keep_cpu_heap_leaves_other_systems_alone(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert step.keep_cpu_heap.__wrapped__() is False


def test_the_trainer_step_keeps_the_heap_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(step, "keep_cpu_heap", lambda: calls.append(1) or True)
    model = torch.nn.Linear(4, 4)

    class Loss(torch.nn.Module):  # the (logits, loss) interface accumulate_gradients calls
        def forward(self, x, y, return_logits=True):
            return None, (model(x) - y).pow(2).mean()

    x = torch.randn(2, 4)
    loss = step.accumulate_gradients(
        Loss(), [(x, x)], torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    )
    assert calls == [1] and loss.ndim == 0 and model.weight.grad is not None
