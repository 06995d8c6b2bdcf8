"""minilm.step.keep_cpu_heap: freed CPU tensor memory stays in the heap, so a step's large
temporaries are reused instead of mapped afresh (checked by glibc's own accounting, not timed)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilm import step

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose minilm is under test
HEAP = """
import ctypes, sys
import torch
from minilm import step

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h): bytes, as size_t
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = step.keep_cpu_heap() if sys.argv[1] == "keep" else False
a = torch.empty(24 * 2**20).fill_(1.0)  # 96 MiB of fp32
alive = libc.mallinfo2()
del a
freed = libc.mallinfo2()
print(kept, alive.hblkhd, freed.fordblks)
"""
MiB = 2**20


def _heap(mode: str) -> tuple[bool, int, int]:
    """(kept, bytes in mmap'd blocks while a 96 MiB tensor lives, free bytes the heap keeps after it dies),
    from glibc's own accounting (mallinfo2), in a fresh interpreter: this process's heap depends on
    the tests before it. (Page faults would show the effect too, but they also depend on whether the
    kernel reclaims idle pages; glibc's accounting does not.)"""
    out = subprocess.run(
        [sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    kept, mmapped, kept_free = out.split()
    return kept == "True", int(mmapped), int(kept_free)


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_keep_cpu_heap_serves_large_tensors_from_the_heap_and_keeps_them():
    kept, mmapped, kept_free = _heap("keep")
    assert kept and mmapped < 96 * MiB <= kept_free  # from the heap, and still there after the free
    # glibc's default: a block this large gets its own mmap, unmapped again by free().
    kept, mmapped, kept_free = _heap("default")
    assert not kept and mmapped >= 96 * MiB > kept_free


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
