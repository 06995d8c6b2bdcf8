"""Training throughput: minilm's GPT against nanoGPT's model.py and Hugging Face's GPT2LMHeadModel.

    python benchmarks/train_throughput.py --nanogpt path/to/nanoGPT/model.py   # tiny and small, ~5 min on 2 cores
    python benchmarks/train_throughput.py --configs tiny --rounds 2 --curve-steps 5   # quick look, HF only
    python benchmarks/train_throughput.py --nanogpt model.py --timer cpu --save    # shared machine; store the record

nanoGPT is not a dependency: give the path of its ``model.py`` (from github.com/karpathy/nanoGPT)
and it joins as a peer, built at the same shapes and loaded with the same weights.

Ratios printed (the targets of issue 17): minilm fp32 against nanoGPT fp32 and HF fp32 (>= 1.0x),
and minilm's *default* against each library's default on a CPU, which is fp32 for both
(nanoGPT's train.py uses autocast only on CUDA): >= 3x nanoGPT at the small config's shape on a
CPU with native bf16. minilm's default is what its trainer runs for a full run of the shipped
config on this CPU: the config's precision (``minilm.precision``: bf16 autocast for small where
the CPU has native bf16; tiny ships fp32), compiled where ``minilm.compile_policy`` says the
warm-up pays (small's 10,000 steps: yes, timed after an untimed warm-up; tiny's 600: no). The
header line of each config says which. On a CPU without native bf16 the script says so and
reports the fp32 ratios only. minilm's steps run its trainer's own step (``minilm.step``: chunked
loss; on a CPU the allocator keeps freed memory, ``minilm.step.keep_cpu_heap``, process-wide, so
nanoGPT and Hugging Face run with it too; ``--no-keep-heap`` in another process measures without).
"minilm bf16 before" is the bf16 step without this
issue's levers (full (B, T, V) logits through F.cross_entropy, attention kernel always in
fp32): the difference is what they bought. The profile's top non-matmul operators (self CPU
time, ``torch.profiler``) are printed for nanoGPT fp32 and minilm's step before and after, and for
the compiled default (compiled without inductor's C++ wrapper for this, which the profiler cannot
see into), whose own generated loops are no aten operator: one row, "(inductor loops, other)",
holds them with the Python and autograd overhead. A compiled CPU step runs its own
kernels where they measured faster (``minilm.compile_policy.compile_model``: inductor's C++
wrapper and ``minilm.graph_passes``' rewrite of the tied embedding's gradient; ``minilm.aten_ops``:
ATen's GELU and LayerNorm, oneDNN's Linear with its bias fused; ``minilm.attention.CausalAttentionCPU``:
attention's backward as matmuls), and its loss curve is checked against fp32 too.

What one "step" is: forward, cross-entropy loss, backward, AdamW update, zero_grad, on one
batch of (batch, seq) tokens: the whole training step, as the trainer runs it.

Like with like:
- Both models are built at identical shapes (vocab, width, heads, layers, MLP width, positions,
  tied embeddings, biases) and hold *identical weights*: the Hugging Face model is created, and
  minilm's GPT loads its weights (``minilm.hf``); the first losses are printed to show they agree.
- Activation: exact GELU (erf) in both: GPT2Config(activation_function="gelu") and minilm's
  activation="gelu". (GPT-2's default "gelu_new", the tanh approximation, costs more on CPU.)
- Attention: fused scaled_dot_product_attention in both (Hugging Face's "sdpa" implementation).
- Loss: Hugging Face: F.cross_entropy on its logits (its own ``labels=`` path shifts inside the
  model and would score one position fewer); nanoGPT: its own forward (the same F.cross_entropy);
  minilm: its trainer's ``model(x, y, return_logits=False)``, the chunked loss of ``minilm.loss``
  (the same mean cross-entropy, without the (B, T, V) logits).
- Optimizer: minilm's own factory (``minilm.optim.make_optimizer``: fused AdamW, weight decay on
  matrices only) for every library, so the update step is the same work for all of them.
- Same batch, same sequence length, same thread count; the four runs (2 models x 2 precisions)
  alternate round by round, so a slow moment on a shared machine hits all of them alike.
  Reported: the best (least disturbed) and the median step time of each.

MFU (model FLOPs utilisation) = training FLOPs per step / step time / peak, where the peak is
measured on the spot: the best rate of a large torch.matmul in fp32, and in bf16 for the bf16
runs. FLOPs per token come from ``minilm.flops`` (the closed form that equals torch's
FlopCounterMode), the same count for every library: they all run the same shape.

Targets (issue 17): minilm fp32 >= 1.0x nanoGPT fp32 and >= 1.0x Hugging Face fp32 at tiny and
small; on a CPU with native bf16, minilm's default >= 3x nanoGPT's default (fp32) at small, with
a bf16 loss curve that tracks fp32 (``--curve-steps`` steps each from one initialisation on the
same Shakespeare batches; the largest difference is printed). Tokens/s come from the median step.
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
for folder in (ROOT, ROOT / "benchmarks"):  # run from a checkout without installing; make_table beside it
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import minilm.attention  # noqa: E402
import minilm.step  # noqa: E402
from minilm.compile_policy import compile_decision, compile_model  # noqa: E402
from minilm.config import Config, load_config  # noqa: E402
from minilm.flops import flops_per_token  # noqa: E402
from minilm.flops import mfu as model_flops_utilisation  # noqa: E402
from minilm.model import GPT  # noqa: E402
from minilm.optim import make_optimizer  # noqa: E402
from minilm.precision import autocast_dtype, cpu_supports_bf16  # noqa: E402

# The matmuls: ATen's, and oneDNN's fused-bias Linear (minilm.aten_ops.linear, compiled on a CPU in bf16)
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::baddbmm",
    "mkldnn::_linear_pointwise",
)

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


# ---------------------------------------------------------------------------------------
# Models and steps
# ---------------------------------------------------------------------------------------
def shipped_config(name: str) -> Config:
    """The named training config as shipped (configs/training/NAME_model.json)."""
    return load_config(ROOT / "configs" / "training" / f"{name}_model.json", check_estimate=False)


def bench_config(name: str, batch: int, seq: int) -> Config:
    """The named training config at the benchmark's sequence length, without dropout."""
    return shipped_config(name).replace(max_seq_len=seq, batch_size=batch, dropout=0.0, attention="sdpa")


@dataclass
class Default:
    """How the trainer runs the shipped config on this CPU: its autocast precision and whether it compiles."""

    precision: str  # "bf16" or "fp32"
    compile: bool
    reason: str  # minilm.compile_policy's words for the run header

    @property
    def label(self) -> str:
        return self.precision + (" compiled" if self.compile else "")


def trainer_default(name: str) -> Default:
    """The default of a full run of the shipped config on this CPU (minilm.precision, minilm.compile_policy):
    a long run (small's 10,000 steps) compiles, a lesson-sized one (tiny's 600) stays eager."""
    cfg = shipped_config(name)
    cpu = torch.device("cpu")
    dtype = autocast_dtype(cfg, cpu)
    pays, reason = compile_decision(cfg, cpu, flops_per_token(cfg))
    return Default("bf16" if dtype == torch.bfloat16 else "fp32", pays, reason)


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


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, before: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy: minilm's trainer loss (``before``: through full logits),
    nanoGPT's own, F.cross_entropy on Hugging Face's logits."""
    if isinstance(model, GPT):
        return model(x, y, return_logits=before)[1]
    if hasattr(model, "transformer") and not hasattr(model, "config_class"):  # nanoGPT
        return model(x, y)[1]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def load_nanogpt(path: str | Path, cfg: Config, ours: GPT) -> torch.nn.Module | None:
    """nanoGPT's GPT from its ``model.py`` at ``path``, at cfg's shapes, with ``ours``'s weights.

    None (with the reason printed) when cfg has a shape nanoGPT cannot express: its MLP is
    always 4·d_model wide with exact GELU, and its head always tied to the embedding.
    """
    import contextlib
    import importlib.util
    import io

    if cfg.ff_width != 4 * cfg.d_model or not cfg.tie_embeddings or cfg.activation != "gelu":
        print("   nanoGPT skipped: it has only d_ff = 4·d_model, tied embeddings and exact GELU")
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gcfg = module.GPTConfig(
        block_size=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_embd=cfg.d_model,
        dropout=0.0,
        bias=cfg.bias,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        theirs = module.GPT(gcfg)
    names = {"transformer.wte": "wte", "transformer.wpe": "wpe", "transformer.ln_f": "ln_f", "transformer.h": "blocks"}
    names |= {"c_attn": "qkv", "c_proj": "proj", "c_fc": "fc"}
    ours_state = ours.state_dict()
    state = {}
    for key in theirs.state_dict():
        mapped = key
        for a, b in names.items():
            mapped = mapped.replace(a, b)
        state[key] = ours_state[mapped]
    theirs.load_state_dict(state)
    return theirs.train()


def make_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype | None, before: bool = False
) -> Callable:
    """One full training step (forward, loss, backward, AdamW, zero_grad) -> loss as a float.

    minilm's GPT (or its torch.compile wrapper) runs the trainer's own step, :mod:`minilm.step`
    (chunked loss); nanoGPT and Hugging Face the usual loop. ``before``: minilm without issue
    17's levers (full logits, attention kernel always fp32), in the usual loop.
    """
    if isinstance(getattr(model, "_orig_mod", model), GPT) and not before:
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def trainer_step(x: torch.Tensor, y: torch.Tensor) -> float:
            ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
            loss = minilm.step.accumulate_gradients(model, [(x, y)], ctx, scaler, chunked_loss=True)
            minilm.step.optimizer_step(opt, scaler)
            return loss.item()

        return trainer_step

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
        threshold = minilm.attention.SDPA_BF16_MIN_T_D2
        if before:
            minilm.attention.SDPA_BF16_MIN_T_D2 = float("inf")
        try:
            with ctx:
                loss = loss_of(model, x, y, before)
            loss.backward()
        finally:
            minilm.attention.SDPA_BF16_MIN_T_D2 = threshold
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def top_non_matmul(step: Callable, x: torch.Tensor, y: torch.Tensor, steps: int = 2, top: int = 6) -> list:
    """The operators with the most self CPU time over ``steps`` steps, matmuls left out: (name, ms/step, share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x, y)
    every = prof.key_averages()
    events = [e for e in every if e.key.startswith(("aten::", "mkldnn::"))]
    named = sum(e.self_cpu_time_total for e in events)  # ATen and oneDNN operators
    total = sum(e.self_cpu_time_total for e in every)
    rows = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)[:top]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    out = [
        (e.key.removeprefix("aten::"), e.self_cpu_time_total / 1e3 / steps, e.self_cpu_time_total / total) for e in rows
    ]
    # A compiled step's own loops (inductor's generated C++) are no aten operator: they show up here,
    # with the Python and autograd overhead that every step has.
    other = total - named
    out.append(("(inductor loops, other)", other / 1e3 / steps, other / total))
    return [("(all matmuls)", matmul / 1e3 / steps, matmul / total), *sorted(out, key=lambda r: -r[1])[:top]]


def cpu_kind() -> str:
    """The CPU's name and whether it multiplies bf16 natively (the instructions torch reports)."""
    cpu = getattr(torch, "cpu", None)
    found = [
        name
        for name, check in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        if bool(getattr(cpu, check, lambda: False)())
    ]
    try:
        from make_table import _cpu_name  # benchmarks/ is on sys.path when run as a script

        name = _cpu_name()
    except ImportError:
        import platform

        name = platform.processor() or platform.machine()
    bf16 = f"native bf16 ({', '.join(found) or 'Arm BF16'})" if cpu_supports_bf16() else "no native bf16"
    return f"{name}, {bf16}"


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
def loss_curves(
    cfg: Config, model: GPT, steps: int, cache_dir: str | None, default: Default | None = None
) -> dict[str, list[float]]:
    """Train copies of ``model`` for ``steps`` steps in fp32 and in bf16 on the same Shakespeare batches,
    and, when ``default`` compiles, as the trainer's default runs (compiled: its own attention backward)."""
    from minilm.data import BatchSampler, prepare_data

    _, train, _ = prepare_data(cfg, cache_dir)
    sampler = BatchSampler(train, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed)
    batches = [sampler.next_batch() for _ in range(steps)]
    runs = [("fp32", None, False), ("bf16", torch.bfloat16, False)]
    if default is not None and default.compile:
        runs.append((default.label, torch.bfloat16 if default.precision == "bf16" else None, True))
    curves = {}
    for name, dtype, compiled in runs:
        m = copy.deepcopy(model)
        opt = make_optimizer(m, cfg, verbose=False)
        step = make_step(compile_model(m, torch.device("cpu")) if compiled else m, opt, dtype)
        curves[name] = [step(x, y) for x, y in batches]
    return curves


# ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="configs to run")
    p.add_argument("--nanogpt", help="path of nanoGPT's model.py: adds it as a peer (not a dependency)")
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
    p.add_argument("--profile-steps", type=int, default=2, help="steps profiled per run for the op table (0: skip)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmuls that measure the peak")
    p.add_argument("--cache-dir", help="token cache for the loss curves (default: minilm.data.default_cache_dir())")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="time minilm's default eager even where a full run of the config would compile (quick looks)",
    )
    p.add_argument(
        "--no-keep-heap",
        action="store_true",
        help="leave glibc's allocator at its defaults (minilm's trainer keeps freed CPU memory for reuse: "
        "minilm.step.keep_cpu_heap); to measure what that lever buys, in a separate process",
    )
    p.add_argument(
        "--save",
        nargs="?",
        const=str(ROOT / "benchmarks" / "results" / "throughput"),
        help="store the record as JSON in this folder (default benchmarks/results/throughput), "
        "named after the machine like make_table.py's records",
    )
    return p.parse_args(argv)


def print_profiles(profiles: dict[str, list]) -> None:
    """The top non-matmul operators of each profiled run, side by side (ms per step, share of the step)."""
    names = list(profiles)
    width = 42
    print("   top non-matmul operators, self CPU ms/step (share of the step's profiled time), torch.profiler:")
    print("     " + "".join(f"{n:<{width}}" for n in names))
    for i in range(max(len(v) for v in profiles.values())):
        cells = []
        for n in names:
            if i < len(profiles[n]):
                op, ms, share = profiles[n][i]
                cells.append(f"{op[:24]:<24} {ms:7.1f} ({share:4.0%})".ljust(width))
            else:
                cells.append(" " * width)
        print("     " + "".join(cells))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the benchmark and print the report; returns the numbers per config (for tests and notebooks)."""
    args = parse_args(argv)
    if args.timer == "cpu":
        args.threads, clock = 1, time.process_time
    else:
        clock = time.perf_counter
    torch.set_num_threads(args.threads)
    native = cpu_supports_bf16()
    print(f"torch {torch.__version__}, {args.threads} thread(s), timed by {args.timer} clock")
    print(f"CPU: {cpu_kind()}")
    if args.no_keep_heap:
        minilm.step.keep_cpu_heap = lambda: False  # the trainer's step asks this module-level function
        kept = False
    else:
        kept = minilm.step.keep_cpu_heap()
    print(
        "allocator: "
        + (
            "glibc keeps freed memory for reuse (minilm.step.keep_cpu_heap, as minilm's trainer sets it; "
            "process-wide, so every library here runs with it)"
            if kept
            else "the C library's defaults (freed large blocks go back to the kernel and fault in again)"
        )
    )
    if not native:
        print(
            "this CPU has no native bf16 matmul: minilm's default here is fp32 (emulated bf16 would be several "
            "times slower), so only the fp32 ratios are measured; the bf16 target needs a CPU with native bf16"
        )
    n = args.peak_size
    precisions = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if native else (("fp32", torch.float32),)
    peak = {name: matmul_peak(dtype, n=n, clock=clock) for name, dtype in precisions}
    print(
        f"measured matmul peak ({n}^3, best of ~1 s): "
        + ", ".join(f"{name} {peak[name] / 1e9:.0f} GFLOP/s" for name in peak)
        + (f" ({peak['bf16'] / peak['fp32']:.1f}x)" if "bf16" in peak else "")
    )
    results = {}
    for name in args.configs:
        batch, seq = SHAPES[name]
        cfg = bench_config(name, args.batch or batch, args.seq or seq)
        default = trainer_default(name)
        if args.no_compile and default.compile:
            default = Default(default.precision, False, "eager: --no-compile")
        print(f"\n{name}: minilm's default on this CPU is {default.precision}, {default.reason}")
        B, T = cfg.batch_size, cfg.max_seq_len
        ours, hf = build_pair(cfg)
        theirs = load_nanogpt(args.nanogpt, cfg, ours) if args.nanogpt else None
        initial = copy.deepcopy(ours.state_dict())  # for the loss curves: the timed models train on
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        with torch.no_grad():
            first = {"minilm": loss_of(ours, x, y).item(), "HF GPT-2": loss_of(hf, x, y).item()}
            if theirs is not None:
                first["nanoGPT"] = loss_of(theirs, x, y).item()
        fpt = flops_per_token(cfg)
        models = [("minilm", ours), ("HF GPT-2", hf)] + ([("nanoGPT", theirs)] if theirs is not None else [])
        # Separate optimizers per run; the fp32 and bf16 runs of one model share its weights (timing only).
        runs = [Run(label, "fp32", make_step(m, make_optimizer(m, cfg, verbose=False), None)) for label, m in models]
        if native:
            runs += [
                Run(label, "bf16", make_step(m, make_optimizer(m, cfg, verbose=False), torch.bfloat16))
                for label, m in models
            ]
            runs.append(
                Run(
                    "minilm before",
                    "bf16",
                    make_step(ours, make_optimizer(ours, cfg, verbose=False), torch.bfloat16, True),
                )
            )
        if default.compile:  # as a full run of this config trains: compiled (the warm-up is not timed)
            dtype = torch.bfloat16 if default.precision == "bf16" else None
            opt = make_optimizer(ours, cfg, verbose=False)
            compiled = make_step(compile_model(ours, torch.device("cpu")), opt, dtype)
            start, wall = clock(), time.perf_counter()
            for _ in range(2):  # the first call compiles; the second catches a recompile
                compiled(x, y)
            print(
                f"   torch.compile warm-up: {clock() - start:.1f} s by the {args.timer} clock, "
                f"{time.perf_counter() - wall:.1f} s wall (C++ compiler included; its cache may be warm)"
            )
            runs.append(Run("minilm compiled", default.precision, compiled))
        time_runs(runs, x, y, args.rounds, args.steps, args.warmup, clock)

        print(
            f"\n== {name}: {sum(p.numel() for p in ours.parameters()):,} parameters, batch {B} x seq {T} "
            f"= {B * T} tokens/step, {fpt / 1e6:.1f} MFLOP/token (minilm.flops)"
        )
        print("   same weights, first loss: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
        print(f"   {'model':<14} {'prec':<5} {'ms/step best':>12} {'median':>8} {'tokens/s':>9} {'MFU':>6}")
        rows = {}
        for r in runs:
            tps = B * T / r.median
            mfu = model_flops_utilisation(tps, cfg, peak[r.precision], n_devices=1)
            rows[f"{r.model} {r.precision}"] = {"ms": r.best * 1e3, "median_ms": r.median * 1e3, "tps": tps, "mfu": mfu}
            print(f"   {r.model:<14} {r.precision:<5} {r.best * 1e3:12.1f} {r.median * 1e3:8.1f} {tps:9.0f} {mfu:6.1%}")
        by = {(r.model, r.precision): r for r in runs}
        ours_default = by[("minilm compiled" if default.compile else "minilm", default.precision)]
        label = f"minilm default ({default.label})"
        pairs = {  # name -> (faster candidate, baseline, target or None)
            "minilm fp32 / HF fp32": (by[("minilm", "fp32")], by[("HF GPT-2", "fp32")], 1.0),
        }
        if theirs is not None:
            pairs["minilm fp32 / nanoGPT fp32"] = (by[("minilm", "fp32")], by[("nanoGPT", "fp32")], 1.0)
        if native:
            pairs[f"{label} / HF default (fp32)"] = (ours_default, by[("HF GPT-2", "fp32")], None)
            if theirs is not None:
                target = 3.0 if name == "small" else None
                pairs[f"{label} / nanoGPT default (fp32)"] = (ours_default, by[("nanoGPT", "fp32")], target)
            bf16 = by[("minilm", "bf16")]
            if theirs is not None:
                pairs["minilm bf16 / nanoGPT bf16"] = (bf16, by[("nanoGPT", "bf16")], None)
            pairs["minilm bf16 / minilm bf16 before"] = (bf16, by[("minilm before", "bf16")], None)
            pairs["minilm bf16 / minilm fp32"] = (bf16, by[("minilm", "fp32")], None)
            if default.compile:
                pairs[f"minilm {default.label} / minilm {default.precision} eager"] = (
                    ours_default,
                    by[("minilm", default.precision)],
                    None,
                )
        ratios, best_ratios = {}, {}
        print("   ratios of tokens/s (from the medians; from the best steps in brackets):")
        for k, (run, base, target) in pairs.items():
            ratios[k], best_ratios[k] = base.median / run.median, base.best / run.best
            met = target is not None and ratios[k] >= target
            verdict = "" if target is None else f"  target >= {target:.1f}x: {'met' if met else 'NOT met'}"
            print(f"   {k:<48} {ratios[k]:5.2f}x  ({best_ratios[k]:.2f}x){verdict}")
        results[name] = {
            "batch": B,
            "seq": T,
            "default": {"precision": default.precision, "compile": default.compile, "reason": default.reason},
            "rows": rows,
            "ratios": ratios,
            "best_ratios": best_ratios,
            "first_loss": first,
        }
        if args.profile_steps:
            profiled = [("nanoGPT", "fp32"), ("minilm", "fp32")] if theirs is not None else [("minilm", "fp32")]
            if native:
                profiled += [("minilm before", "bf16"), ("minilm", "bf16")]
            profiles = {f"{m} {p}": top_non_matmul(by[(m, p)].step, x, y, args.profile_steps) for m, p in profiled}
            if default.compile:
                # The profiler cannot see into inductor's C++ wrapper (not even the matmuls it calls), so the
                # compiled default is profiled as compiled without it: the same kernels, called from Python.
                dtype = torch.bfloat16 if default.precision == "bf16" else None
                wrapper = compile_model(ours, torch.device("cpu"), cpp_wrapper=False)
                plain = make_step(wrapper, make_optimizer(ours, cfg, verbose=False), dtype)
                plain(x, y)  # compiles
                profiles[f"minilm compiled {default.precision} (Python wrapper)"] = top_non_matmul(
                    plain, x, y, args.profile_steps
                )
            print_profiles(profiles)
            results[name]["profiles"] = profiles

        if args.curve_steps and native:
            fresh = GPT(cfg)
            fresh.load_state_dict(initial)
            curves = loss_curves(cfg, fresh, args.curve_steps, args.cache_dir, default)
            print(f"   loss curves, {args.curve_steps} steps from one init on Shakespeare ({cfg.tokenizer} tokens):")
            for run, curve in curves.items():
                print(f"     {run:<14} " + " ".join(f"{v:.3f}" for v in curve))
            drop = curves["fp32"][0] - curves["fp32"][-1]
            max_diff = {}
            for run, curve in curves.items():
                if run == "fp32":
                    continue
                max_diff[run] = max(abs(a - b) for a, b in zip(curves["fp32"], curve, strict=True))
                print(
                    f"     max |fp32 - {run}| = {max_diff[run]:.4f} nats ({max_diff[run] / drop:.1%} of the fp32 "
                    f"loss drop of {drop:.3f}); final {curves['fp32'][-1]:.4f} vs {curve[-1]:.4f}"
                )
            results[name]["curves"] = curves
            results[name]["curve_max_diff"] = max(max_diff.values())
    if args.save:
        save_record(results, args, peak)
    return results


def _argv_without_paths(argv: list[str]) -> list[str]:
    """The command's options without --nanogpt PATH and --save [FOLDER] (local paths)."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            skip = False
            continue
        skip = a in ("--nanogpt", "--save")
        if not skip and not a.startswith(("--nanogpt=", "--save=")):
            out.append(a)
    return out


def save_record(results: dict, args: argparse.Namespace, peak: dict[str, float]) -> Path:
    """Write the run as JSON beside make_table.py's records, named after the machine as they are."""
    import json

    from make_table import machine_description, machine_slug

    info = machine_description()
    info["cpu_kind"] = cpu_kind()
    record = {
        "machine": info,
        "command": "python benchmarks/train_throughput.py " + " ".join(_argv_without_paths(sys.argv[1:])),
        "timer": args.timer,
        "threads": args.threads,
        "matmul_peak_flops": peak,
        "keep_cpu_heap": not args.no_keep_heap,
        "results": results,
    }
    folder = Path(args.save)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{machine_slug(info)}-{args.timer}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
