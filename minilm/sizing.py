"""Choosing a model size: what fits a machine, how long it trains, and what to change when it does not fit.

Built on :mod:`minilm.memory` (peak bytes of a step) and :mod:`minilm.flops` (FLOPs per
token). A machine is a :class:`Hardware`: memory per device, device count, and a
throughput — measured tokens/s, or a peak FLOP/s and an assumed MFU.

    >>> from minilm.config import load_config
    >>> from minilm.sizing import Hardware, plan_to_fit, size_options, sizing_table, design_claims_table
    >>> hw = Hardware.from_accelerator("RTX 4090")                 # 24 GB, 165 TFLOP/s bf16, MFU 0.4
    >>> configs = {n: load_config(f"configs/training/{n}_model.json") for n in ("small", "base", "large")}
    >>> print(sizing_table(size_options(configs, hw, hours=24)))
    >>> print(plan_to_fit(configs["base"].replace(batch_size=64), Hardware(memory_gb=16)).table())
    >>> print(design_claims_table())

**What "fits" means.** The estimated peak of a step as minilm's trainer runs it, with its
chunked loss (:func:`minilm.memory.trainer_step_memory`; what ``torch.cuda.max_memory_allocated``
would report) must stay under the device memory minus a reserve for what no tensor
tracker sees (:data:`minilm.memory.NOT_COUNTED`): ``context_gb`` for the CUDA context and
workspaces, and a ``headroom`` fraction for the caching allocator's fragmentation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from minilm.config import Config, configs_dir, load_config
from minilm.counting import count_parameters, format_count
from minilm.flops import chinchilla_tokens, flop_breakdown, flops_per_token, tokens_per_second_at
from minilm.formatting import format_hours, render_table
from minilm.memory import GB, trainer_step_memory


@dataclass(frozen=True)
class Hardware:
    """A training machine: memory per device, how many devices, how fast.

    Throughput is either measured (``tokens_per_second`` per device) or derived from a
    device's peak FLOP/s (a number or a name from :mod:`minilm.hardware`) at an assumed
    ``mfu`` — 0.3-0.5 is typical for well-tuned GPT training, lower for small models.
    """

    memory_gb: float  # per device, GiB
    n_devices: int = 1
    peak_flops: float | str | None = None  # one device's dense peak, or an accelerator name
    mfu: float = 0.4
    tokens_per_second: float | None = None  # measured, per device; overrides peak_flops × mfu
    context_gb: float = 1.0  # CUDA context, cuBLAS/NCCL workspaces: memory no tensor tracker sees
    headroom: float = 0.10  # fraction kept free for the allocator's rounding and fragmentation
    name: str = ""

    @classmethod
    def from_accelerator(cls, name: str, n_devices: int = 1, mfu: float = 0.4, **kwargs) -> Hardware:
        """A machine of ``n_devices`` known accelerators (see :data:`minilm.hardware.ACCELERATORS`)."""
        from minilm.hardware import get_accelerator

        acc = get_accelerator(name)
        return cls(memory_gb=acc.memory_gb, n_devices=n_devices, peak_flops=acc.name, mfu=mfu, name=acc.name, **kwargs)

    @property
    def usable_bytes(self) -> int:
        """Bytes per device a training step's tensors may use: memory × (1 - headroom) - context."""
        return int((self.memory_gb * (1 - self.headroom) - self.context_gb) * GB)

    def describe(self) -> str:
        what = self.name or f"{self.memory_gb:g} GB"
        return f"{self.n_devices} × {what}" if self.n_devices > 1 else what


def _on(cfg: Config, hw: Hardware) -> Config:
    """The config as it would run on ``hw``: one DDP process per device, and bf16 as fp16 on
    hardware without bf16 (V100, T4), as :func:`minilm.precision.autocast_dtype` runs it there."""
    changes: dict = {}
    if cfg.world_size != hw.n_devices:
        changes["world_size"] = hw.n_devices
    if cfg.bf16 and not _bf16_supported(hw):
        changes.update(bf16=False, fp16=True)
    return cfg.replace(**changes) if changes else cfg


def peak_bytes(cfg: Config, hw: Hardware | None = None) -> int:
    """Estimated peak bytes per device of one training step as minilm's trainer runs it: its
    chunked loss (no (b, s, V) logits) and fused AdamW (:func:`minilm.memory.trainer_step_memory`)."""
    return trainer_step_memory(_on(cfg, hw) if hw else cfg).peak_bytes


def fits(cfg: Config, hw: Hardware) -> bool:
    """Does one training step of ``cfg`` fit each device of ``hw`` (see "What fits means")?"""
    return peak_bytes(cfg, hw) <= hw.usable_bytes


def throughput(cfg: Config, hw: Hardware) -> float:
    """Training tokens per second on the whole machine."""
    if hw.tokens_per_second is not None:
        return hw.tokens_per_second * hw.n_devices
    if hw.peak_flops is None:
        raise ValueError("Hardware needs tokens_per_second or peak_flops to estimate time")
    return tokens_per_second_at(_on(cfg, hw), hw.peak_flops, hw.mfu, hw.n_devices)


def training_hours(cfg: Config, tokens: float, hw: Hardware) -> float:
    """Hours to train ``cfg`` on ``tokens`` tokens on ``hw``."""
    return tokens / throughput(cfg, hw) / 3600


def largest_batch_that_fits(cfg: Config, hw: Hardware, limit: int = 4096) -> int:
    """The largest micro-batch (sequences per device) whose step fits; 0 if not even one does."""
    lo, hi = 0, 1
    while hi <= limit and fits(cfg.replace(batch_size=hi), hw):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(cfg.replace(batch_size=mid), hw) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------
# Which sizes fit, and how long they take
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeOption:
    """One config on one machine: memory, speed, and its training budgets."""

    name: str
    config: Config
    n_parameters: int
    peak_bytes: int  # per device
    fits: bool
    tokens_per_second: float  # whole machine
    chinchilla_tokens: int  # 20·N
    chinchilla_flops: int  # FLOPs per token × 20·N
    hours_to_chinchilla: float
    tokens_in_budget: float | None  # tokens trainable within ``hours`` (None without a time budget)
    hours_to_target: float | None  # hours to ``target_tokens`` (None without a target)

    @property
    def chinchilla_in_budget(self) -> bool | None:
        """Can it reach its compute-optimal token count within the time budget?"""
        return None if self.tokens_in_budget is None else self.tokens_in_budget >= self.chinchilla_tokens


def size_options(
    configs: Mapping[str, Config],
    hw: Hardware,
    hours: float | None = None,
    target_tokens: float | None = None,
) -> list[SizeOption]:
    """Each config on ``hw``: does it fit, its speed, Chinchilla budget and time, what ``hours`` buys."""
    out = []
    for name, cfg in configs.items():
        cfg = _on(cfg, hw)
        tps = throughput(cfg, hw)
        n = count_parameters(cfg).total
        d = chinchilla_tokens(n)
        out.append(
            SizeOption(
                name=name,
                config=cfg,
                n_parameters=n,
                peak_bytes=peak_bytes(cfg),
                fits=fits(cfg, hw),
                tokens_per_second=tps,
                chinchilla_tokens=d,
                chinchilla_flops=flops_per_token(cfg) * d,
                hours_to_chinchilla=d / tps / 3600,
                tokens_in_budget=None if hours is None else hours * 3600 * tps,
                hours_to_target=None if target_tokens is None else target_tokens / tps / 3600,
            )
        )
    return out


def sizing_table(options: list[SizeOption], fmt: str = "text") -> str:
    """The :func:`size_options` result as a text or markdown table."""
    head = ["config", "params", "peak GiB", "fits", "tokens/s", "20·N tokens", "time to 20·N"]
    if any(o.tokens_in_budget is not None for o in options):
        head.append("tokens in budget")
    if any(o.hours_to_target is not None for o in options):
        head.append("time to target")
    rows = []
    for o in options:
        row = [
            o.name,
            format_count(o.n_parameters),
            f"{o.peak_bytes / GB:.2f}",
            "yes" if o.fits else "NO",
            format_count(o.tokens_per_second),
            format_count(o.chinchilla_tokens),
            format_hours(o.hours_to_chinchilla),
        ]
        if "tokens in budget" in head:
            row.append(format_count(o.tokens_in_budget) if o.tokens_in_budget is not None else "-")
        if "time to target" in head:
            row.append(format_hours(o.hours_to_target) if o.hours_to_target is not None else "-")
        rows.append(row)
    return render_table(head, rows, fmt)


# ---------------------------------------------------------------------------------------
# The design's troubleshooting advice, executable
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Levers:
    """The memory-saving changes a plan step applies, as data (its labels are derived from these)."""

    precision: str | None = None  # 'bf16' or 'fp16' when autocast is switched on; None: unchanged
    checkpointing: bool = False  # gradient checkpointing switched on
    halvings: int = 0  # micro-batch halved this many times, accumulation doubled as often
    n_layers: int | None = None  # a smaller model with this many layers; None: the model as configured
    fsdp_gpus: int | None = None  # sharded with FSDP (ZeRO-3) over this many GPUs; None: as configured

    @property
    def count(self) -> int:
        """How many kinds of change are applied (0: the config as it is)."""
        changes = [self.precision is not None, self.checkpointing, self.halvings > 0, self.n_layers is not None]
        return sum(changes) + (self.fsdp_gpus is not None)


@dataclass(frozen=True)
class PlanStep:
    """A config with some memory-saving changes applied, and what it costs."""

    changes: tuple[str, ...]  # human-readable, in the order applied; empty for the original
    levers: Levers  # the same changes, as data: plans choose by these, never by the labels
    config: Config
    peak_bytes: int
    fits: bool
    compute_factor: float  # hardware FLOPs per token relative to the original (checkpointing: ~1.2)
    changes_model: bool  # a smaller model: the result is a different network
    n_gpus: int = 1  # GPUs the step runs on (FSDP options: the GPUs it is sharded over)
    tokens_per_second: float | None = None  # FSDP options: the whole run's estimated throughput

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step on one device: batch_size × grad_accumulation_steps."""
        return self.config.batch_size * self.config.grad_accumulation_steps

    def describe(self) -> str:
        return " + ".join(self.changes) if self.changes else "as configured"


@dataclass(frozen=True)
class FitPlan:
    """Options for a config that may not fit, and the cheapest combination that does."""

    hardware: Hardware
    original: PlanStep
    options: list[PlanStep]  # each change alone, for comparison
    best: PlanStep | None  # the cheapest combination that fits (None: nothing found)
    considered: int = 0  # combinations evaluated
    notes: list[str] = field(default_factory=list)

    def table(self, fmt: str = "text") -> str:
        usable = self.hardware.usable_bytes / GB
        head = ["change", "peak GiB", "fits", "compute", "micro-batch x accum"]
        sharded = any(step.n_gpus > 1 or step.tokens_per_second for step in self.options)
        if sharded:  # per-GPU memory and the whole run's speed, only when FSDP options were asked for
            head = ["change", "per-GPU peak GiB", "fits", "compute", "micro-batch x accum", "GPUs", "tokens/s"]
        rows = []
        for step in [self.original, *self.options]:
            row = [
                step.describe(),
                f"{step.peak_bytes / GB:.2f}",
                "yes" if step.fits else "no",
                f"{step.compute_factor:.2f}x",
                f"{step.config.batch_size} x {step.config.grad_accumulation_steps}",
            ]
            if sharded:
                row += [str(step.n_gpus), f"{step.tokens_per_second:,.0f}" if step.tokens_per_second else "-"]
            rows.append(row)
        if self.best is not None:
            verdict = f"cheapest that fits: {self.best.describe()} ({self.best.peak_bytes / GB:.2f} GiB)"
        else:
            verdict = "nothing tried fits: a bigger device or more devices are needed"
        note = f"usable per device: {usable:.2f} GiB of {self.hardware.memory_gb:g} GB. {verdict}"
        note += "".join(f"\nnote: {n}" for n in self.notes)
        return render_table(head, rows, fmt, note=note)


def _labels(levers: Levers, cfg: Config) -> tuple[str, ...]:
    """The changes in words, in the order applied (``cfg``: the config before them)."""
    labels = [f"FSDP (ZeRO-3) over {levers.fsdp_gpus} GPUs"] if levers.fsdp_gpus else []
    if levers.precision == "bf16":
        labels.append("bf16 autocast")
    elif levers.precision == "fp16":
        labels.append("fp16 autocast (+ grad scaler)")
    if levers.checkpointing:
        labels.append("gradient checkpointing")
    if levers.halvings:
        k = 2**levers.halvings
        labels.append(f"micro-batch {cfg.batch_size}->{cfg.batch_size // k}, accumulation x{k}")
    return tuple(labels)


def _lever_configs(cfg: Config, bf16_ok: bool) -> list[tuple[Levers, Config]]:
    """Every combination of precision, checkpointing and batch halvings, applied to ``cfg``."""
    precisions = [None]
    if cfg.precision == "fp32":
        precisions.append("bf16" if bf16_ok else "fp16")
    max_halvings = int(math.log2(cfg.batch_size)) if cfg.batch_size > 0 else 0
    out = []
    for precision, ckpt in itertools.product(precisions, (False, True)):
        if ckpt and cfg.gradient_checkpointing:
            continue
        base = cfg.replace(bf16=precision == "bf16", fp16=precision == "fp16") if precision else cfg
        base = base.replace(gradient_checkpointing=True) if ckpt else base
        for k in range(max_halvings + 1):
            if cfg.batch_size % (2**k):
                break  # keep the effective batch exact: only halve while the batch divides evenly
            b, acc = cfg.batch_size // 2**k, cfg.grad_accumulation_steps * 2**k
            levers = Levers(precision=precision, checkpointing=ckpt, halvings=k, n_layers=None)
            out.append((levers, base.replace(batch_size=b, grad_accumulation_steps=acc)))
    return out


def _bf16_supported(hw: Hardware) -> bool:
    if isinstance(hw.peak_flops, str):
        from minilm.hardware import get_accelerator

        return get_accelerator(hw.peak_flops).bf16 is not None
    return True


def plan_to_fit(
    cfg: Config, hw: Hardware | float, *, allow_smaller_model: bool = True, shard_gpus: tuple[int, ...] = ()
) -> FitPlan:
    """The design's out-of-memory advice made executable: the cheapest change that makes ``cfg`` fit.

    ``hw`` is a :class:`Hardware` or just the memory per device in GB. Candidates combine
    bf16/fp16 autocast, gradient checkpointing and "halve the micro-batch, double the
    accumulation" (repeatedly; the effective batch, and so the optimisation, stays the
    same). Cheapest means, in order: keeps the model; least extra compute (checkpointing
    re-runs the forward, about +20% FLOPs); fewest halvings (smaller matmuls run less
    efficiently); no precision change. Only if no combination fits does it shrink the
    model: the most layers that fit with the cheapest combination.

    ``shard_gpus`` (e.g. ``(2, 4, 8)``) adds, for each N, FSDP (ZeRO-3) over N GPUs of this
    kind with the cheapest combination of the other changes that fits, its per-GPU peak
    (:func:`minilm.sharding.estimate_rank_memory`) and the run's tokens per second on N GPUs
    at ``hw.mfu`` (FSDP's all-gathers and reduce-scatters assumed overlapped with compute,
    as on one node with NVLink; across slow links expect less). When nothing fits ``hw`` as
    it is, sharding over the fewest GPUs that fit is preferred to shrinking the model.
    """
    hw = hw if isinstance(hw, Hardware) else Hardware(memory_gb=float(hw))
    cfg_in, cfg = cfg, _on(cfg, hw)
    base_flops = flop_breakdown(cfg)
    base_hw_flops = base_flops.total + base_flops.checkpoint_recompute

    def step(levers: Levers, c: Config, before: Config, changes_model: bool = False) -> PlanStep:
        fb = flop_breakdown(c)
        return PlanStep(
            changes=_labels(levers, before),
            levers=levers,
            config=c,
            peak_bytes=peak_bytes(c),
            fits=fits(c, hw),
            compute_factor=(fb.total + fb.checkpoint_recompute) / base_hw_flops if not changes_model else 1.0,
            changes_model=changes_model,
        )

    bf16_ok = _bf16_supported(hw)
    original = step(Levers(), cfg, cfg)
    candidates = [step(lv, c, cfg) for lv, c in _lever_configs(cfg, bf16_ok)]
    # Each change alone (the first halving only, and the largest), to show what each knob buys.
    singles = [s for s in candidates if s.levers.count == 1]
    options = [s for s in singles if not s.levers.halvings]
    halvings = [s for s in singles if s.levers.halvings]
    options += halvings[:1] + (halvings[-1:] if len(halvings) > 1 else [])

    def cost(s: PlanStep) -> tuple:
        lv = s.levers
        return (s.changes_model, round(s.compute_factor, 3), lv.halvings, lv.precision is not None)

    fitting = sorted((s for s in candidates if s.fits), key=cost)
    best = fitting[0] if fitting else None
    notes: list[str] = []
    if cfg.fp16 and not cfg_in.fp16:
        notes.append(
            f"{hw.name or 'this device'} has no bf16: planned in fp16 with a gradient scaler, as the trainer runs it"
        )
    considered = len(candidates)
    sharded: list[PlanStep] = []
    for n in shard_gpus:
        items = [_fsdp_step(lv, c, cfg, n, hw, base_hw_flops) for lv, c in _lever_configs(cfg, bf16_ok)]
        considered += len(items)
        fitting_n = sorted((s for s in items if s.fits), key=cost)
        sharded.append(fitting_n[0] if fitting_n else items[0])
    options += sharded
    if best is None and any(s.fits for s in sharded):
        best = min((s for s in sharded if s.fits), key=lambda s: (s.n_gpus, *cost(s)))
        notes.append(f"nothing fits one {hw.name or 'device'}: sharding with FSDP over {best.n_gpus} GPUs does")
    if best is None and allow_smaller_model:
        for n_layers in range(cfg.n_layers - 1, 0, -1):
            smaller = cfg.replace(n_layers=n_layers)
            items = [step(lv, c, smaller, changes_model=True) for lv, c in _lever_configs(smaller, bf16_ok)]
            considered += len(items)
            fitting = sorted((s for s in items if s.fits), key=cost)
            if fitting:
                s = fitting[0]
                n_old, n_new = count_parameters(cfg).total, count_parameters(smaller).total
                label = (
                    f"smaller model: {cfg.n_layers}->{n_layers} layers ({format_count(n_old)}->{format_count(n_new)})"
                )
                levers = dataclasses.replace(s.levers, n_layers=n_layers)
                best = PlanStep((label, *s.changes), levers, s.config, s.peak_bytes, True, 1.0, True)
                notes.append("no combination of precision, checkpointing and batch fits: the model had to shrink")
                break
    return FitPlan(hardware=hw, original=original, options=options, best=best, considered=considered, notes=notes)


def _fsdp_step(levers: Levers, c: Config, before: Config, n: int, hw: Hardware, base_hw_flops: int) -> PlanStep:
    """``c`` sharded with FSDP (ZeRO-3) over ``n`` GPUs like ``hw``'s: per-GPU peak and the run's throughput."""
    from minilm.sharding import estimate_rank_memory

    sharded = c.replace(world_size=n, parallelism="fsdp", reshard_after_forward=True)
    levers = dataclasses.replace(levers, fsdp_gpus=n)
    peak = estimate_rank_memory(sharded, "zero3", n).peak_bytes
    fb = flop_breakdown(sharded)
    speed = None
    if hw.tokens_per_second is not None:
        speed = hw.tokens_per_second * n
    elif hw.peak_flops is not None:
        speed = tokens_per_second_at(sharded, hw.peak_flops, hw.mfu, n)
    return PlanStep(
        changes=_labels(levers, before),
        levers=levers,
        config=sharded,
        peak_bytes=peak,
        fits=peak <= hw.usable_bytes,
        compute_factor=(fb.total + fb.checkpoint_recompute) / base_hw_flops,
        changes_model=False,
        n_gpus=n,
        tokens_per_second=speed,
    )


# ---------------------------------------------------------------------------------------
# The design's claims, checked
# ---------------------------------------------------------------------------------------
# From the design README (SEED.md): its parameter labels, the GPU it recommends per config,
# and its benchmark table's "GPU memory" and "training speed" (no method given).
DESIGN_CLAIMS: dict[str, dict[str, object]] = {
    "small": {"label": "124M", "recommended_gpu_gb": 8, "claimed_memory_gb": 6, "claimed_tokens_per_s": 1000},
    "base": {"label": "355M", "recommended_gpu_gb": 16, "claimed_memory_gb": 12, "claimed_tokens_per_s": 800},
    "large": {"label": "1.3B", "recommended_gpu_gb": 24, "claimed_memory_gb": 20, "claimed_tokens_per_s": 600},
}


@dataclass(frozen=True)
class ClaimCheck:
    """One shipped config at its own batch settings against the design's recommended GPU."""

    name: str
    n_parameters: int
    design_label: str
    config: Config
    peak_bytes: int  # per GPU, at the config's micro-batch
    recommended_gpu_gb: float
    claimed_memory_gb: float
    fits_recommended: bool
    largest_batch_on_recommended: int
    tokens_per_second: float | None  # at the assumed device and MFU, per GPU
    claimed_tokens_per_s: float


def design_claims(
    config_dir: str | Path | None = None, throughput_device: str | None = "RTX 4090", mfu: float = 0.4
) -> list[ClaimCheck]:
    """Check each shipped config (``configs/training``) against the design's hardware claims.

    Memory is per GPU at the config's own ``batch_size``, precision, checkpointing and
    ``world_size``. Throughput, if ``throughput_device`` is given, is one such GPU at ``mfu``.
    """
    config_dir = Path(config_dir) if config_dir else configs_dir() / "training"
    out = []
    for name, claim in DESIGN_CLAIMS.items():
        path = config_dir / f"{name}_model.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a stated estimate that is off is the point of this table
            cfg = load_config(path)
        gpu = Hardware(memory_gb=float(claim["recommended_gpu_gb"]), n_devices=cfg.world_size)
        tps = None
        if throughput_device is not None:
            tps = tokens_per_second_at(cfg, throughput_device, mfu, n_devices=1)
        out.append(
            ClaimCheck(
                name=name,
                n_parameters=count_parameters(cfg).total,
                design_label=str(claim["label"]),
                config=cfg,
                peak_bytes=peak_bytes(cfg),
                recommended_gpu_gb=float(claim["recommended_gpu_gb"]),
                claimed_memory_gb=float(claim["claimed_memory_gb"]),
                fits_recommended=fits(cfg, gpu),
                largest_batch_on_recommended=largest_batch_that_fits(cfg, gpu),
                tokens_per_second=tps,
                claimed_tokens_per_s=float(claim["claimed_tokens_per_s"]),
            )
        )
    return out


def design_claims_table(
    fmt: str = "text", config_dir: str | Path | None = None, throughput_device: str | None = "RTX 4090"
) -> str:
    """:func:`design_claims` as a table: estimated memory per GPU vs the recommended GPU."""
    checks = design_claims(config_dir, throughput_device)
    head = ["config", "params (label)", "batch x accum x GPUs", "precision", "est. GiB/GPU", "claimed GB"]
    head += ["recommended GPU", "fits", "max micro-batch"]
    if throughput_device:
        head += [f"tok/s/GPU est. ({throughput_device}, 40% MFU)", "claimed tok/s"]
    rows = []
    for c in checks:
        cfg = c.config
        prec = cfg.precision + (" + ckpt" if cfg.gradient_checkpointing else "")
        row = [
            c.name,
            f"{format_count(c.n_parameters)} ({c.design_label})",
            f"{cfg.batch_size} x {cfg.grad_accumulation_steps} x {cfg.world_size}",
            prec,
            f"{c.peak_bytes / GB:.2f}",
            f"{c.claimed_memory_gb:g}",
            f"{c.recommended_gpu_gb:g} GB",
            "yes" if c.fits_recommended else "NO",
            str(c.largest_batch_on_recommended),
        ]
        if throughput_device:
            row += [format_count(c.tokens_per_second), f"{c.claimed_tokens_per_s:g}"]
        rows.append(row)
    note = (
        "Estimated peak per GPU of one training step (tensors only; fits = under memory x 0.9 - 1 GB). "
        "Sequence length 1024 throughout."
    )
    return render_table(head, rows, fmt, note=note)


# ---------------------------------------------------------------------------------------
# Scaling: loss against compute, and the compute-optimal size (Hoffmann et al. 2022)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingLaw:
    """A parametric loss fit ``L(N, D) = E + A / N**alpha + B / D**beta``.

    ``N`` is parameters (all of them, embeddings included), ``D`` training tokens, ``L``
    the loss in nats per token on the fit's own data and tokenizer: the numbers carry over
    to another corpus only as a shape, never as values. Training compute is ``C = 6·N·D``
    FLOPs. Every method takes floats or NumPy arrays (it is arithmetic only).

    Along an iso-FLOP line (``D = C / 6N``) the loss has one minimum. Setting
    ``dL/dN = 0`` gives ``alpha·A·N**-alpha = beta·B·(6N/C)**beta``, so

        N_opt(C) = G · (C/6) ** (beta / (alpha+beta)),   G = (alpha·A / (beta·B)) ** (1 / (alpha+beta))
        D_opt(C) = (C/6) / N_opt(C) = (C/6) ** (alpha / (alpha+beta)) / G
    """

    E: float  # irreducible loss, nats/token
    A: float
    B: float
    alpha: float  # exponent of N
    beta: float  # exponent of D
    source: str = ""

    def loss(self, n_parameters, tokens):
        """Predicted loss (nats/token) of N parameters trained on D tokens."""
        return self.E + self.A / n_parameters**self.alpha + self.B / tokens**self.beta

    def iso_flop_loss(self, flops, n_parameters):
        """Predicted loss of N parameters trained with ``flops`` FLOPs (so on D = C / 6N tokens)."""
        return self.loss(n_parameters, flops / (6 * n_parameters))

    @property
    def parameter_exponent(self) -> float:
        """a in N_opt ∝ C**a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def _g(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal_parameters(self, flops):
        """N_opt(C): the parameter count with the lowest predicted loss for ``flops`` FLOPs."""
        return self._g * (flops / 6) ** self.parameter_exponent

    def optimal_tokens(self, flops):
        """D_opt(C) = C / (6·N_opt): the tokens that go with :meth:`optimal_parameters`."""
        return flops / (6 * self.optimal_parameters(flops))

    def optimal_loss(self, flops):
        """The lowest predicted loss ``flops`` FLOPs can buy."""
        return self.iso_flop_loss(flops, self.optimal_parameters(flops))


# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3
# (eq. 10 / appendix D): the rounded constants the paper's text reports. Besiroglu et al. 2024
# ("Chinchilla scaling: a replication attempt") refit the same data and found the optimum's
# tokens per parameter closer to approaches 1 and 2 (about 20): read this fit as a shape.
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, source="Hoffmann et al. 2022, approach 3")


def rule_of_thumb_parameters(flops: float, tokens_per_parameter: float = 20) -> float:
    """N for a compute budget under the two rules of thumb D = 20·N and C = 6·N·D: sqrt(C / 120)."""
    return math.sqrt(flops / (6 * tokens_per_parameter))


def budget_flops(hw: Hardware, hours: float) -> float:
    """Training FLOPs ``hw`` delivers in ``hours``: dense peak FLOP/s × MFU × devices × seconds.

    An accelerator name is priced at its bf16 peak (fp16 where it has no bf16), as a
    mixed-precision run would use it; a number is taken as FLOP/s.
    """
    if hw.peak_flops is None:
        raise ValueError("budget_flops needs a Hardware with peak_flops (FLOP/s or an accelerator name)")
    if isinstance(hw.peak_flops, str):
        from minilm.hardware import get_accelerator

        acc = get_accelerator(hw.peak_flops)
        peak = acc.bf16 if acc.bf16 is not None else acc.peak("fp16")
    else:
        peak = float(hw.peak_flops)
    return peak * hw.mfu * hw.n_devices * hours * 3600
