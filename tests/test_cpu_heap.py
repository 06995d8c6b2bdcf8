"""minilm.step.keep_cpu_heap: freed CPU tensor memory stays in the heap, so a step's large
temporaries are reused instead of page-faulted in afresh (counted by the kernel, not timed)."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from minilm import step


def _faults_per_round(rounds: int = 3) -> float:
    """Minor page faults per allocate-write-free of a 96 MiB and a 16 MiB tensor (a step's temporaries)."""

    def one() -> None:
        a = torch.empty(24 * 2**20).fill_(1.0)  # 96 MiB of fp32
        b = torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB
        del a, b

    one()
    one()  # the heap has grown to hold them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_keep_cpu_heap_reuses_freed_blocks_without_page_faults():
    assert step.keep_cpu_heap() is True
    # Without it, every round faults each 4 KiB page of both tensors in again (~28,000 faults).
    assert _faults_per_round() < 100


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
