"""Training throughput: minilm's GPT against Hugging Face's GPT2LMHeadModel, fp32 and bf16 autocast.

    python benchmarks/train_throughput.py                    # tiny and small configs, ~2-3 minutes on 2 cores
    python benchmarks/train_throughput.py --configs tiny --rounds 2 --curve-steps 5   # quick look

What one "step" is: forward, cross-entropy loss, backward, AdamW update, zero_grad, on one
batch of (batch, seq) tokens: the whole training step, as the trainer runs it.

Like with like:
- Both models are built at identical shapes (vocab, width, heads, layers, MLP width, positions,
  tied embeddings, biases) and hold *identical weights*: the Hugging Face model is created, and
  minilm's GPT loads its weights (``minilm.hf``); the first losses are printed to show they agree.
- Activation: exact GELU (erf) in both: GPT2Config(activation_function="gelu") and minilm's
  activation="gelu". (GPT-2's default "gelu_new", the tanh approximation, costs more on CPU.)
- Attention: fused scaled_dot_product_attention in both (Hugging Face's "sdpa" implementation).
- Loss: the same F.cross_entropy on the logits, for both (Hugging Face's own ``labels=`` path
  shifts inside the model and would score one position fewer).
- Optimizer: torch.optim.AdamW with fused=True for both (PyTorch's fused CPU kernel, ~4x faster
  than the default per-tensor loop; the trainer should use it too).
- Same batch, same sequence length, same thread count; the four runs (2 models x 2 precisions)
  alternate round by round, so a slow moment on a shared machine hits all of them alike.
  Reported: the best (least disturbed) and the median step time of each.

MFU (model FLOPs utilisation) = training FLOPs per step / step time / peak, where the peak is
measured on the spot: the best rate of a large torch.matmul in fp32, and in bf16 for the bf16
runs. FLOPs per token come from ``minilm.flops`` when it is installed, else from the usual
6·N + 12·L·T·d estimate (N = parameters in matmuls, attention over the full T x T square).

Targets on the 2-core avx512_bf16 CPU this toolkit was developed on: minilm fp32 >= 1.0x the
Hugging Face fp32 reference; minilm bf16 autocast >= 2x that reference, with a bf16 loss curve
that tracks fp32 (``--curve-steps`` steps each from one initialisation on the same Shakespeare
batches; the largest difference is printed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilm.config import Config, load_config  # noqa: E402
from minilm.model import GPT  # noqa: E402
from minilm.precision import cpu_supports_bf16  # noqa: E402

# Benchmark shapes: tiny at its own training shape; small at a modest one that fits a CPU minute.
SHAPES = {"tiny": (32, 128), "small": (4, 256)}  # name -> (batch, seq)


# ---------------------------------------------------------------------------------------
# Peak and FLOPs
# ---------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0, clock: Callable = time.perf_counter) -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) torch.matmul in ``dtype``, over ~``seconds``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up: thread pool, kernel selection
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


def flops_per_token(cfg: Config) -> tuple[float, str]:
    """Training FLOPs (forward + backward) per token at sequence length cfg.max_seq_len, and the source."""
    try:
        from minilm.flops import flops_per_token as minilm_flops  # the analytics module, when present

        return float(minilm_flops(cfg)), "minilm.flops"
    except ImportError:
        d, L, T = cfg.d_model, cfg.n_layers, cfg.max_seq_len
        n_matmul = L * (4 * d * d + 2 * d * cfg.ff_width) + d * cfg.vocab_size  # blocks + LM head
        return 6.0 * n_matmul + 12.0 * L * T * d, "6N + 12LTd"


# ---------------------------------------------------------------------------------------
# Models and steps
# ---------------------------------------------------------------------------------------
def bench_config(name: str, batch: int, seq: int) -> Config:
    """The named training config at the benchmark's sequence length, without dropout."""
    cfg = load_config(ROOT / "configs" / "training" / f"{name}_model.json", check_estimate=False)
    return cfg.replace(max_seq_len=seq, batch_size=batch, dropout=0.0, attention="sdpa")


def build_pair(cfg: Config) -> tuple[GPT, torch.nn.Module]:
    """(minilm GPT, Hugging Face GPT2LMHeadModel) at the same shapes, holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from minilm.hf import state_dict_from_hf

    hf_logging.set_verbosity_error()
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ff_width,
        activation_function="gelu",  # exact GELU, as minilm's activation="gelu"
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(cfg.seed)
    hf = GPT2LMHeadModel(hf_cfg)
    hf.set_attn_implementation("sdpa")
    ours = GPT(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, f"parameter counts differ: minilm {n_ours:,}, Hugging Face {n_hf:,}"
    return ours.train(), hf.train()


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed the same way for both libraries."""
    if isinstance(model, GPT):
        return model(x, y)[1]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=True,
    )


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype | None) -> Callable:
    """One full training step (forward, loss, backward, AdamW, zero_grad) -> loss as a float."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


@dataclass
class Run:
    model: str  # "minilm" or "HF GPT-2"
    precision: str  # "fp32" or "bf16"
    step: Callable
    times: list[float] = field(default_factory=list)  # seconds per step

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_runs(
    runs: list[Run], x: torch.Tensor, y: torch.Tensor, rounds: int, steps: int, warmup: int, clock: Callable
) -> None:
    """Alternate the runs: each round runs ``steps`` timed steps of every run, in a rotating order."""
    for run in runs:
        for _ in range(warmup):
            run.step(x, y)
    for r in range(rounds):
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            for _ in range(steps):
                t = clock()
                run.step(x, y)
                run.times.append(clock() - t)


# ---------------------------------------------------------------------------------------
# bf16 against fp32: loss curves from one initialisation on the same data
# ---------------------------------------------------------------------------------------
def loss_curves(cfg: Config, model: GPT, steps: int, cache_dir: str | None) -> dict[str, list[float]]:
    """Train copies of ``model`` for ``steps`` steps in fp32 and in bf16 on the same Shakespeare batches."""
    from minilm.data import BatchSampler, prepare_data

    _, train, _ = prepare_data(cfg, cache_dir)
    sampler = BatchSampler(train, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed)
    batches = [sampler.next_batch() for _ in range(steps)]
    curves = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        m = copy.deepcopy(model)
        step = make_step(m, make_optimizer(m, cfg), dtype)
        curves[name] = [step(x, y) for x, y in batches]
    return curves


# ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="configs to run")
    p.add_argument("--batch", type=int, help="override the batch size of every config")
    p.add_argument("--seq", type=int, help="override the sequence length of every config")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    p.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time with --threads threads. cpu: one thread, timed by the process's CPU time, "
        "which other programs on a shared machine barely disturb (use it to compare kernels there)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run before timing")
    p.add_argument("--curve-steps", type=int, default=20, help="steps of the bf16-vs-fp32 loss curves (0: skip)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmuls that measure the peak")
    p.add_argument("--cache-dir", help="token cache for the loss curves (default: minilm.data.default_cache_dir())")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the benchmark and print the report; returns the numbers per config (for tests and notebooks)."""
    args = parse_args(argv)
    if args.timer == "cpu":
        args.threads, clock = 1, time.process_time
    else:
        clock = time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), timed by {args.timer} clock, "
        f"CPU bf16 matmul: {cpu_supports_bf16()}"
    )
    if not cpu_supports_bf16():
        print(
            "this CPU has no native bf16 matmul: the bf16 rows run emulated (several times slower than fp32; "
            "the trainer would pick fp32 here), so the bf16 target cannot be met on this machine"
        )
    n = args.peak_size
    peak = {
        name: matmul_peak(dtype, n=n, clock=clock)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"measured matmul peak ({n}^3, best of ~1 s): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.1f}x)"
    )
    results = {}
    for name in args.configs:
        batch, seq = SHAPES[name]
        cfg = bench_config(name, args.batch or batch, args.seq or seq)
        B, T = cfg.batch_size, cfg.max_seq_len
        ours, hf = build_pair(cfg)
        initial = copy.deepcopy(ours.state_dict())  # for the loss curves: the timed models train on
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        with torch.no_grad():
            first = (loss_of(ours, x, y).item(), loss_of(hf, x, y).item())
        fpt, fpt_source = flops_per_token(cfg)
        runs = [
            Run(model, prec, make_step(m, make_optimizer(m, cfg), dtype))
            for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16))
            for model, m in (("minilm", ours), ("HF GPT-2", hf))
        ]
        # Separate optimizers per run; fp32 and bf16 runs of one model share its weights (timing only).
        time_runs(runs, x, y, args.rounds, args.steps, args.warmup, clock)

        print(
            f"\n== {name}: {sum(p.numel() for p in ours.parameters()):,} parameters, batch {B} x seq {T} "
            f"= {B * T} tokens/step, {fpt / 1e6:.1f} MFLOP/token ({fpt_source})"
        )
        print(f"   same weights, first loss: minilm {first[0]:.5f}, HF {first[1]:.5f}")
        print(f"   {'model':<9} {'prec':<5} {'ms/step best':>12} {'median':>8} {'tokens/s':>9} {'MFU':>6}")
        ref = next(r for r in runs if r.model == "HF GPT-2" and r.precision == "fp32")
        rows = {}
        for r in runs:
            tps = B * T / r.best
            mfu = fpt * tps / peak[r.precision]
            rows[f"{r.model} {r.precision}"] = {"ms": r.best * 1e3, "median_ms": r.median * 1e3, "tps": tps, "mfu": mfu}
            print(f"   {r.model:<9} {r.precision:<5} {r.best * 1e3:12.1f} {r.median * 1e3:8.1f} {tps:9.0f} {mfu:6.1%}")
        ours32 = next(r for r in runs if r.model == "minilm" and r.precision == "fp32")
        ours16 = next(r for r in runs if r.model == "minilm" and r.precision == "bf16")
        pairs = {  # name -> (faster candidate, baseline, target or None)
            "minilm fp32 / HF fp32": (ours32, ref, 1.0),
            "minilm bf16 / HF fp32": (ours16, ref, 2.0),
            "minilm bf16 / minilm fp32": (ours16, ours32, None),
        }
        ratios, medians = {}, {}
        for k, (run, base, target) in pairs.items():
            ratios[k], medians[k] = base.best / run.best, base.median / run.median
            met = target is not None and ratios[k] >= target
            verdict = "" if target is None else f"  target >= {target:.1f}x: {'met' if met else 'NOT met'}"
            print(f"   {k:<27} {ratios[k]:5.2f}x  (from medians {medians[k]:.2f}x){verdict}")
        # Amdahl: if bf16 sped up only the matmuls (by the measured peak ratio) and everything else
        # (attention kernel, norms, GELU, loss, casts, optimizer) kept its fp32 time, the best bf16
        # could do against this fp32 step. The fp32 MFU is roughly the matmuls' share of the step.
        share = rows["HF GPT-2 fp32"]["mfu"]
        ceiling = 1 / ((1 - share) + share / (peak["bf16"] / peak["fp32"]))
        print(
            f"   bf16 ceiling vs HF fp32 if only the matmuls sped up ({share:.0%} of the fp32 step, "
            f"{peak['bf16'] / peak['fp32']:.1f}x faster): {ceiling:.2f}x"
        )
        results[name] = {
            "rows": rows,
            "ratios": ratios,
            "median_ratios": medians,
            "first_loss": first,
            "bf16_ceiling": ceiling,
        }

        if args.curve_steps:
            fresh = GPT(cfg)
            fresh.load_state_dict(initial)
            curves = loss_curves(cfg, fresh, args.curve_steps, args.cache_dir)
            diffs = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)]
            print(f"   loss curves, {args.curve_steps} steps from one init on Shakespeare ({cfg.tokenizer} tokens):")
            print("     fp32: " + " ".join(f"{v:.3f}" for v in curves["fp32"]))
            print("     bf16: " + " ".join(f"{v:.3f}" for v in curves["bf16"]))
            drop = curves["fp32"][0] - curves["fp32"][-1]
            print(
                f"     max |fp32 - bf16| = {max(diffs):.4f} nats ({max(diffs) / drop:.1%} of the fp32 loss drop "
                f"of {drop:.3f}); final {curves['fp32'][-1]:.4f} vs {curves['bf16'][-1]:.4f}"
            )
            results[name]["curves"] = curves
            results[name]["curve_max_diff"] = max(diffs)
    return results


if __name__ == "__main__":
    main()
