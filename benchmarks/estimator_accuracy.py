"""How accurate are minilm's closed-form estimates? Estimate vs measurement, case by case.

    python benchmarks/estimator_accuracy.py            # memory grid + variants + FLOPs, on CPU (~1 minute)
    python benchmarks/estimator_accuracy.py --quick    # the memory grid only
    python benchmarks/estimator_accuracy.py --cuda     # memory measured with torch.cuda.max_memory_allocated

Memory: the estimated peak of one training step (minilm.memory) against the peak measured
on a real step (minilm.measure: live tensor storages on CPU, the allocator on CUDA), over
the grid of the test suite (3 shapes x batch 1/4 x sequence 64/256 x checkpointing x
fp32/bf16) and other variants. FLOPs: the closed form (minilm.flops) against PyTorch's
FlopCounterMode on real forward + backward passes. Ends with the worst case.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minilm.config import Config  # noqa: E402
from minilm.flops import count_flops, flop_breakdown  # noqa: E402
from minilm.measure import (  # noqa: E402
    VALIDATION_GRID,
    VALIDATION_SHAPES,
    VALIDATION_VARIANTS,
    VARIANT_BASE,
    measure_training_step,
)
from minilm.memory import estimate_training_memory  # noqa: E402


@dataclass
class Case:
    name: str
    estimated: int
    measured: int
    where: str = ""

    @property
    def error(self) -> float:
        return (self.estimated - self.measured) / self.measured


def memory_cases(quick: bool, device: str) -> list[Case]:
    device_type = torch.device(device).type
    cases = []
    for (shape, dims), (b, s, ckpt, bf16) in itertools.product(VALIDATION_SHAPES.items(), VALIDATION_GRID):
        cfg = Config(**dims, max_seq_len=s, batch_size=b, gradient_checkpointing=ckpt, bf16=bf16)
        name = f"{shape} b={b} s={s}{' ckpt' if ckpt else ''}{' bf16' if bf16 else ''}"
        cases.append((name, cfg, "fused"))
        if bf16 and device_type == "cuda":  # a GPU also runs fp16 (with a gradient scaler)
            cases.append((name.replace("bf16", "fp16"), cfg.replace(bf16=False, fp16=True), "fused"))
    if not quick:
        for (variant, changes), opt in itertools.product(VALIDATION_VARIANTS.items(), ["fused", "foreach", "for-loop"]):
            cases.append((f"{variant} [{opt}]", Config(**{**VARIANT_BASE, **changes}), opt))
    out = []
    for name, cfg, opt in cases:
        m = measure_training_step(cfg, optimizer=opt, device=device)
        e = estimate_training_memory(cfg, optimizer=opt, device_type=device_type)
        out.append(Case(name, e.peak_bytes, m.peak_bytes, f"est: {e.peak_moment} / measured: {m.peak_at}"))
        c = out[-1]
        print(f"  {name:<44} est {c.estimated / 2**20:8.3f} MiB  meas {c.measured / 2**20:8.3f} MiB  {c.error:+7.3%}")
    return out


def flop_cases() -> list[Case]:
    out = []
    for (shape, dims), attention, ckpt in itertools.product(
        VALIDATION_SHAPES.items(), ["manual", "sdpa"], [False, True]
    ):
        cfg = Config(**dims, max_seq_len=64, attention=attention, gradient_checkpointing=ckpt)
        counted = count_flops(cfg, batch_size=2, device="cpu")
        expected = flop_breakdown(cfg, device_type="cpu").hardware_total * counted.tokens
        name = f"{shape} {attention}{' ckpt' if ckpt else ''}"
        out.append(Case(name, expected, counted.total))
        print(f"  {name:<32} closed form {expected:>14,}  FlopCounterMode {counted.total:>14,}  {out[-1].error:+.2%}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Case]:
    """Print every case and return the worst memory and FLOPs cases."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="memory grid only, no variants or FLOPs")
    p.add_argument("--cuda", action="store_true", help="measure on the GPU (torch.cuda.max_memory_allocated)")
    args = p.parse_args(argv)
    device = "cuda" if args.cuda else "cpu"
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest and steadiest
    t0 = time.perf_counter()
    print(f"Training-memory peak, estimate vs measured on {device} (steady-state step, AdamW):")
    mem = memory_cases(args.quick, device)
    worst = {"memory": max(mem, key=lambda c: abs(c.error))}
    if not args.quick:
        print("\nTraining FLOPs (forward + backward, hardware FLOPs incl. recompute), closed form vs FlopCounterMode:")
        flops = flop_cases()
        worst["flops"] = max(flops, key=lambda c: abs(c.error))
    print(f"\n{len(mem)} memory cases in {time.perf_counter() - t0:.0f} s")
    mean = sum(abs(c.error) for c in mem) / len(mem)
    print(f"mean |error| {mean:.3%}; all within 10%: {all(abs(c.error) <= 0.1 for c in mem)}")
    print(f"worst |error| {max(abs(c.error) for c in mem):.3%} (target on CUDA: <= 5%)")
    w = worst["memory"]
    print(f"worst memory case: {w.name}: estimated {w.estimated:,} B, measured {w.measured:,} B ({w.error:+.3%})")
    print(f"  ({w.where})")
    if "flops" in worst:
        w = worst["flops"]
        print(f"worst FLOPs case: {w.name}: closed form {w.estimated:,}, counted {w.measured:,} ({w.error:+.3%})")
    return worst


if __name__ == "__main__":
    main()
