"""Regenerate docs/benchmarks.md: what every shipped config costs, computed, and measured where it runs.

    python benchmarks/make_table.py               # measure on this machine, save the results, write the page
    python benchmarks/make_table.py --no-measure  # rewrite the page from the library and saved results (seconds)
    python benchmarks/make_table.py --check       # exit 1 if docs/benchmarks.md is out of date

The page has two kinds of numbers, kept apart:

* **Computed** (deterministic, the same on every machine): parameter counts
  (``minilm.counting``), peak training memory per GPU at each config's own batch settings in
  fp32 / bf16 / fp16, with and without gradient checkpointing (``minilm.memory``), FLOPs per
  token and the Chinchilla budget (``minilm.flops``), and time to that budget on named GPUs
  at a stated MFU (``minilm.flops.tokens_per_second_at``, peaks from ``minilm.hardware``);
  the design's claimed table beside them. ``tests/test_benchmarks_table.py`` checks these
  against the library.
* **Measured** (varies by machine and by load): training tokens/s, MFU and peak memory,
  each in a section headed with the machine it ran on. Measuring saves
  ``benchmarks/results/<machine>.json``; the page is rendered from every saved result, so
  a GPU run and a CPU run can both appear. On a CPU it measures the configs small enough
  (tiny at its own settings; small at micro-batch 1); on a CUDA GPU every shipped config
  at its own settings, with ``torch.cuda.max_memory_allocated`` and the device name.

Throughput is measured with minilm's own :class:`minilm.trainer.Trainer` on the bundled
corpus (the code path of ``python train.py``): the median of the per-step tokens/s it
records, after warm-up steps. Peak memory is :func:`minilm.measure.measure_training_step`:
on CPU a tensor-storage tracker, on CUDA the allocator's ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import string
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilm.config import Config, load_config  # noqa: E402
from minilm.counting import count_parameters, format_count  # noqa: E402
from minilm.flops import compute_optimal, flops_per_token, tokens_per_second_at  # noqa: E402
from minilm.formatting import format_hours, render_table  # noqa: E402
from minilm.hardware import ACCELERATORS, datasheet_name  # noqa: E402
from minilm.memory import GB, estimate_training_memory, trainer_step_memory  # noqa: E402
from minilm.sizing import DESIGN_CLAIMS, Hardware, design_claims, design_claims_table, throughput  # noqa: E402

OUTPUT = ROOT / "docs" / "benchmarks.md"
TEMPLATES = ROOT / "benchmarks" / "templates"  # the page's prose, with $names for the numbers
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("tiny", "small", "base", "large", "xl")
SHARDED = ("large", "xl")  # the per-GPU memory tables under DDP and ZeRO-1/2/3
SHARD_WORLD_SIZES = (1, 2, 4, 8)
GPUS = ("H100 SXM", "A100 80GB", "RTX 4090", "L4", "T4")  # named GPUs for the time estimates
MFU = 0.40  # the stated MFU of every time estimate
PRECISIONS = {
    "fp32": {"bf16": False, "fp16": False},
    "bf16": {"bf16": True, "fp16": False},
    "fp16": {"bf16": False, "fp16": True},
}

# The design's benchmark table, verbatim (SEED.md): no method, batch, data set or GPU given.
DESIGN_TABLE = {
    "small": {"memory": "6 GB", "speed": "1000 tok/s", "converge": "12 h", "ppl": "~15", "hours": 12},
    "base": {"memory": "12 GB", "speed": "800 tok/s", "converge": "2 days", "ppl": "~12", "hours": 48},
    "large": {"memory": "20 GB", "speed": "600 tok/s", "converge": "1 week", "ppl": "~10", "hours": 168},
}

COMPUTED_BEGIN = "<!-- computed: begin (tests/test_benchmarks_table.py checks everything up to 'computed: end') -->"
COMPUTED_END = "<!-- computed: end -->"


def shipped(name: str) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(ROOT / "configs" / "training" / f"{name}_model.json")


def with_precision(cfg: Config, precision: str, checkpointing: bool | None = None) -> Config:
    changes = dict(PRECISIONS[precision])
    if checkpointing is not None:
        changes["gradient_checkpointing"] = checkpointing
    return cfg.replace(**changes)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f}"


# ---------------------------------------------------------------------------------------
# Computed numbers
# ---------------------------------------------------------------------------------------
def memory_gib(cfg: Config, precision: str, checkpointing: bool) -> float:
    """Estimated peak GiB per GPU of one step as minilm's trainer runs it (chunked loss), at the config's batch."""
    return trainer_step_memory(with_precision(cfg, precision, checkpointing)).peak_bytes / GB


def gpu_tokens_per_second(cfg: Config, gpu: str, mfu: float = MFU) -> float:
    """Estimated tokens/s on ``cfg.world_size`` GPUs of this kind at ``mfu`` (fp16 where a GPU has no bf16)."""
    return throughput(cfg, Hardware.from_accelerator(gpu, n_devices=cfg.world_size, mfu=mfu))


def hours_to_chinchilla(cfg: Config, gpu: str, mfu: float = MFU) -> float:
    return compute_optimal(cfg).tokens / gpu_tokens_per_second(cfg, gpu, mfu) / 3600


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    return render_table(head, rows, "markdown", align).split("\n")


def render_counts() -> str:
    rows = []
    for name in CONFIGS:
        cfg = shipped(name)
        pc = count_parameters(cfg)
        co = compute_optimal(cfg)
        run_tokens = cfg.max_steps * cfg.tokens_per_step
        rows.append(
            [
                f"`{name}`",
                f"{pc.total:,}",
                f"{pc.non_embedding:,}",
                f"{flops_per_token(cfg) / 1e6:,.1f}M",
                f"{cfg.tokens_per_step:,}",
                f"{co.tokens / 1e6:,.1f}M",
                f"{co.optimizer_steps:,}",
                f"{run_tokens / pc.total:.1f}",
            ]
        )
    head = [
        "config",
        "parameters",
        "non-embedding",
        "FLOPs / token",
        "tokens / step",
        "20·N tokens",
        "steps to 20·N",
        "tokens / param in `max_steps`",
    ]
    return render_table(head, rows, "markdown")


def render_memory() -> str:
    head = ["config", "batch × seq (× GPUs)"]
    for p in PRECISIONS:
        head += [f"{p}", f"{p} + ckpt"]
    rows = []
    for name in CONFIGS:
        cfg = shipped(name)
        own = (cfg.precision, cfg.gradient_checkpointing)
        row = [
            f"`{name}`",
            f"{cfg.batch_size} × {cfg.max_seq_len}" + (f" (× {cfg.world_size})" if cfg.world_size > 1 else ""),
        ]
        for p in PRECISIONS:
            for ck in (False, True):
                cell = f"{memory_gib(cfg, p, ck):.2f}"
                row.append(f"**{cell}**" if (p, ck) == own else cell)
        rows.append(row)
    return render_table(head, rows, "markdown")


def render_sharded() -> str:
    """Per-GPU peak of each sharded config under every strategy at 1-8 GPUs (``minilm.sharding``)."""
    from minilm.sharding import rank_memory_table

    parts = []
    for name in SHARDED:
        cfg = shipped(name)
        ckpt = "with" if cfg.gradient_checkpointing else "without"
        parts.append(
            f"**`{name}`** ({format_count(count_parameters(cfg).total)} parameters; micro-batch "
            f"{cfg.batch_size} × {cfg.max_seq_len} per GPU, {cfg.precision_label}, {ckpt} checkpointing), "
            f"per-GPU peak in GiB:\n\n{rank_memory_table(cfg, SHARD_WORLD_SIZES)}"
        )
    return "\n\n".join(parts)


def render_time() -> str:
    head = ["config", "GPUs", "20·N tokens"] + [f"{g}" for g in GPUS]
    rows = []
    for name in CONFIGS:
        cfg = shipped(name)
        row = [f"`{name}`", str(cfg.world_size), f"{compute_optimal(cfg).tokens / 1e6:,.0f}M"]
        for g in GPUS:
            tps = gpu_tokens_per_second(cfg, g)
            row.append(f"{format_hours(hours_to_chinchilla(cfg, g))} ({format_count(tps)} tok/s)")
        rows.append(row)
    return render_table(head, rows, "markdown", "lrr" + "r" * len(GPUS))


def _verdict_memory(name: str) -> str:
    cfg = shipped(name)
    est = memory_gib(cfg, cfg.precision, cfg.gradient_checkpointing)
    claimed = float(DESIGN_TABLE[name]["memory"].split()[0])
    ratio = claimed / est
    verdict = "consistent" if abs(ratio - 1) <= 0.15 else f"the claim is {ratio:.1f}× the estimate"
    return f"{est:.2f} GiB per GPU at the shipped settings: {verdict}"


def _verdict_speed(name: str, gpu: str = "RTX 4090") -> str:
    cfg = shipped(name)
    tps = tokens_per_second_at(cfg, gpu, MFU, n_devices=1)
    claimed = float(DESIGN_TABLE[name]["speed"].split()[0])
    return f"{format_count(tps)} tok/s per {gpu} at {MFU:.0%} MFU: claim {tps / claimed:,.0f}× too low"


def _verdict_time(name: str) -> str:
    cfg = shipped(name)
    claim = DESIGN_TABLE[name]
    n = count_parameters(cfg).total
    implied = float(claim["speed"].split()[0]) * claim["hours"] * 3600
    return (
        f"claimed speed × claimed time = {implied / 1e6:,.0f}M tokens = {implied / n:.1f} per parameter "
        f"(20·N needs {compute_optimal(cfg).tokens / 1e6:,.0f}M); 20·N on one RTX 4090 at {MFU:.0%} MFU: "
        f"{format_hours(compute_optimal(cfg).tokens / tokens_per_second_at(cfg, 'RTX 4090', MFU, n_devices=1) / 3600)}"
    )


def _speed_ratios() -> str:
    ratios = [
        tokens_per_second_at(shipped(n), "RTX 4090", MFU, n_devices=1) / float(DESIGN_TABLE[n]["speed"].split()[0])
        for n in DESIGN_TABLE
    ]
    return f"{min(ratios):,.0f}× to {max(ratios):,.0f}×"


def _memory_ratios() -> str:
    """How many times the trainer's estimate (chunked loss) each design memory claim is, as a range."""
    ratios = [c.claimed_memory_gb / (c.peak_bytes / GB) for c in design_claims(throughput_device=None)]
    return f"{min(ratios):.1f}× to {max(ratios):.1f}×"


def _plain_loop_memory() -> str:
    """Each design config's estimate for a plain ``loss = model(x, y)`` loop, which holds the full logits."""
    return ", ".join(f"{estimate_training_memory(shipped(n)).peak_bytes / GB:.2f} GiB for `{n}`" for n in DESIGN_TABLE)


def _time_range() -> str:
    hours = {
        n: compute_optimal(shipped(n)).tokens / tokens_per_second_at(shipped(n), "RTX 4090", MFU, n_devices=1) / 3600
        for n in DESIGN_TABLE
    }
    lo, hi = min(hours, key=hours.get), max(hours, key=hours.get)
    return f"from {format_hours(hours[lo])} (`{lo}`) to {format_hours(hours[hi])} (`{hi}`)"


def render_design() -> str:
    rows = []
    for name, claim in DESIGN_TABLE.items():
        rows.append([f"`{name}` ({DESIGN_CLAIMS[name]['label']})", claim["memory"], _verdict_memory(name)])
        rows.append(["", claim["speed"], _verdict_speed(name)])
        rows.append(["", claim["converge"], _verdict_time(name)])
        rows.append(["", f"PPL {claim['ppl']}", "not checkable: no data set, tokenizer or token count given"])
    return render_table(["model (design's label)", "claim", "computed"], rows, "markdown", "lll")


def _peaks() -> str:
    def peak(g: str) -> str:
        acc = ACCELERATORS[g]
        return f"{g} {acc.bf16 / 1e12:g}" if acc.bf16 else f"{g} {acc.fp16 / 1e12:g} (fp16)"

    return ", ".join(peak(g) for g in GPUS)


def _fill(template: str, **values: str) -> str:
    """``benchmarks/templates/<template>`` with its ``$names`` filled in: the page's prose lives there."""
    return string.Template((TEMPLATES / template).read_text()).substitute(values)


def render_computed() -> str:
    """Everything on the page that does not depend on the machine: a pure function of the library."""
    return _fill(
        "computed.md",
        computed_begin=COMPUTED_BEGIN,
        computed_end=COMPUTED_END,
        counts_table=render_counts(),
        memory_table=render_memory(),
        sharded_tables=render_sharded(),
        time_table=render_time(),
        design_table=render_design(),
        claims_table=design_claims_table("markdown"),
        mfu=f"{MFU:.0%}",
        peaks=_peaks(),
        true_sizes=" / ".join(format_count(count_parameters(shipped(n)).total) for n in ("small", "base", "large")),
        speed_ratios=_speed_ratios(),
        time_range=_time_range(),
        memory_ratios=_memory_ratios(),
        plain_loop_memory=_plain_loop_memory(),
    )


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
@dataclass
class Case:
    """One measured configuration: a shipped config with some overrides."""

    config: str  # shipped name
    overrides: dict
    steps: int  # optimizer steps to run; the first `warmup` are not timed
    warmup: int
    label: str = ""

    def cfg(self) -> Config:
        return shipped(self.config).replace(**self.overrides)

    def command(self) -> str:
        """The train.py command equivalent to the timed run."""
        flags = {**self.overrides, "max_steps": self.steps}
        flags.setdefault("warmup_steps", min(shipped(self.config).warmup_steps, self.steps))
        text = " ".join(
            f"--{k} {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in flags.items()
        )
        return f"python train.py --config configs/training/{self.config}_model.json {text}"


def cpu_cases(bf16: bool) -> list[Case]:
    cases = [Case("tiny", {}, steps=14, warmup=4, label="tiny, as shipped (fp32)")]
    if bf16:
        cases.append(Case("tiny", {"bf16": True}, steps=14, warmup=4, label="tiny, bf16 autocast"))
    cases.append(
        Case(
            "small",
            {"batch_size": 1, "grad_accumulation_steps": 1, "bf16": False},
            steps=6,
            warmup=2,
            label="small at micro-batch 1 (fp32)",
        )
    )
    return cases


def gpu_cases() -> list[Case]:
    # Each config at its own settings on one GPU (world_size 1: the per-GPU step is the same,
    # without DDP's gradient buckets).
    out = []
    for name in CONFIGS:
        if name == "xl":  # written to be sharded over 8 GPUs: its per-rank memory is checked on CPU processes
            continue
        cfg = shipped(name)
        ov = {"world_size": 1} if cfg.world_size > 1 else {}
        out.append(Case(name, ov, steps=12 if name != "large" else 8, warmup=3, label=f"{name}, as shipped"))
        if name in ("small", "base"):  # compile off and on: the warm-up steps hold the compilation
            label = f"{name}, as shipped, torch.compile"
            out.append(Case(name, {**ov, "compile": True}, steps=16, warmup=6, label=label))
    return out


def machine_description() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "os": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
        info["cuda"] = torch.version.cuda
    else:
        from minilm.precision import cpu_supports_bf16

        info["device"] = "cpu"
        # bf16 rows mean bf16 only on CPUs that multiply it natively; elsewhere the trainer runs fp32.
        info["cpu_native_bf16"] = cpu_supports_bf16()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(info: dict) -> str:
    """The results file's name: the GPU, or the CPU with its core count and bf16 support."""
    name = info["device"]
    if name == "cpu":
        name = f"cpu {info['cpu']} {info['cpu_count']} cores" + (" bf16" if info.get("cpu_native_bf16") else "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure_case(case: Case, device: str, cache_dir: str | None) -> dict:
    """Time ``case`` with the real Trainer, then measure the peak memory of one step."""
    import torch

    from minilm.hardware import measure_matmul_flops
    from minilm.measure import measure_training_step
    from minilm.precision import autocast_dtype
    from minilm.trainer import Trainer

    cfg = case.cfg()
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        run_cfg = cfg.replace(
            max_steps=case.steps,
            warmup_steps=min(cfg.warmup_steps, case.steps),
            eval_steps=10**6,
            save_steps=10**6,
            eval_batches=1,
            output_dir=out,
            device=device,
        )
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(
            run_cfg,
            progress=False,
            verbose=False,
            handle_signals=False,
            sample_tokens=0,
            cache_dir=cache_dir,
            callbacks={"on_step_end": lambda tr, rec: rates.append(rec["tokens_per_s"])},
        )
        dtype = autocast_dtype(run_cfg, trainer.device)
        trainer.train()
        trainer_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        trainer.close()
        del trainer
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    timed = rates[case.warmup :]
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
    size = 4096 if device.startswith("cuda") else 1024
    matmul_peak = measure_matmul_flops(dtype or torch.float32, size=size, device=device)
    # Peak memory of one steady-state step: the same step, synthetic tokens.
    measured = measure_training_step(memory_config(case.cfg(), precision), device=device)
    result = {
        "label": case.label,
        "config": case.config,
        "overrides": case.overrides,
        "command": case.command(),
        "precision": precision,
        "timed_steps": len(timed),
        "tokens_per_s": [round(r, 1) for r in timed],
        "matmul_peak_flops": round(matmul_peak),
        "peak_bytes_measured": measured.peak_bytes,
        "memory_method": measured.method,
    }
    if trainer_peak is not None:
        result["trainer_max_memory_allocated"] = trainer_peak
        result["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    return result


def memory_config(cfg: Config, precision: str) -> Config:
    """The config as it ran: with the precision the trainer actually used (fp32 where bf16 was unavailable)."""
    return with_precision(cfg, precision)


def derived(record: dict, r: dict) -> dict:
    """Numbers computed from a saved measurement with today's library: medians, MFU, the memory estimate."""
    cfg = shipped(r["config"]).replace(**r["overrides"])
    on_gpu = record["device"] != "cpu"
    tps = statistics.median(r["tokens_per_s"])
    model_flops = tps * flops_per_token(cfg)
    est = estimate_training_memory(memory_config(cfg, r["precision"]), device_type="cuda" if on_gpu else "cpu")
    out = {
        "cfg": cfg,
        "tps": tps,
        "tps_min": min(r["tokens_per_s"]),
        "tps_max": max(r["tokens_per_s"]),
        "mfu_vs_matmul": model_flops / r["matmul_peak_flops"],
        "estimated": est.peak_bytes,
    }
    acc = datasheet_name(record["machine"]["device"]) if on_gpu else None
    if acc is not None:
        out["datasheet"] = acc
        out["mfu_vs_datasheet"] = model_flops / ACCELERATORS[acc].peak(r["precision"])
    return out


def measure(device: str | None = None, cache_dir: str | None = None, configs: list[str] | None = None) -> dict:
    """Run the measurements for this machine and return a results record (also printed)."""
    import torch

    from minilm.precision import cpu_supports_bf16

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_description()
    cases = gpu_cases() if device.startswith("cuda") else cpu_cases(cpu_supports_bf16())
    if configs:
        cases = [c for c in cases if c.config in configs]
    rows = []
    for case in cases:
        print(f"measuring {case.label} on {device} ...", flush=True)
        row = measure_case(case, device, cache_dir)
        tps = statistics.median(row["tokens_per_s"])
        print(f"  {tps:,.0f} tokens/s, peak {row['peak_bytes_measured'] / GB:.3f} GiB", flush=True)
        rows.append(row)
    return {"machine": info, "device": device, "results": rows}


# ---------------------------------------------------------------------------------------
# Measured sections
# ---------------------------------------------------------------------------------------
def load_results(folder: Path = RESULTS) -> list[dict]:
    """Saved measurement records, GPUs first, then by name."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    return sorted(records, key=lambda r: (r["device"] == "cpu", machine_slug(r["machine"])))


def render_measured(record: dict) -> str:
    m = record["machine"]
    on_gpu = record["device"] != "cpu"
    where = (
        f"{m['device']} ({m.get('device_memory_gib', '?')} GiB), CUDA {m.get('cuda')}"
        if on_gpu
        else f"{m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads)"
        + {True: ", native bf16", False: ", no native bf16 (bf16 runs fp32)"}.get(m.get("cpu_native_bf16"), "")
    )
    lines = [
        f"### Measured on {where}",
        "",
        f"torch {m['torch']}, Python {m['python']}, {m['os']}, {m['date']}."
        + (
            f" Load average at the start: {', '.join(str(x) for x in m['load_average_at_start'])} "
            f"on {m['cpu_count']} cores."
            if "load_average_at_start" in m
            else ""
        ),
        "",
    ]
    if not on_gpu and m.get("load_average_at_start", [0])[0] > m["cpu_count"]:
        lines += [
            "**This machine was shared while measuring** (load average above its core count): other processes "
            "competed for the cores, so throughput and the matmul peak are lower and noisier than the machine "
            "can do alone. The memory columns are not affected.",
            "",
        ]
    head = ["run", "batch × seq × accum", "precision", "tokens/s (median)", "range", "MFU"]
    head += ["peak measured", "estimated", "estimate error"]
    rows = []
    for r in record["results"]:
        d = derived(record, r)
        cfg = d["cfg"]
        mfu = f"{d['mfu_vs_matmul']:.1%} of measured matmul peak ({r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s)"
        if "mfu_vs_datasheet" in d:
            mfu = f"{d['mfu_vs_datasheet']:.1%} of {d['datasheet']} datasheet; " + mfu
        meas, est = r["peak_bytes_measured"], d["estimated"]
        rows.append(
            [
                r["label"],
                f"{cfg.batch_size} × {cfg.max_seq_len} × {cfg.grad_accumulation_steps}",
                r["precision"] + (" + ckpt" if cfg.gradient_checkpointing else ""),
                f"{d['tps']:,.0f}",
                f"{d['tps_min']:,.0f}–{d['tps_max']:,.0f}",
                mfu,
                f"{meas / GB:.3f} GiB",
                f"{est / GB:.3f} GiB",
                f"{(est - meas) / meas:+.1%}",
            ]
        )
    lines += _table(head, rows, "lllrrlrrr")
    lines += [
        "",
        "Commands (each timed run is this training run; the table reports the median step after warm-up):",
        "",
    ]
    lines += ["<!-- slow: measurement runs; `python benchmarks/make_table.py` runs them all -->", "```bash"]
    lines += [r["command"] for r in record["results"]]
    lines += ["```", ""]
    if on_gpu and any("trainer_max_memory_allocated" in r for r in record["results"]):
        lines += [
            "`torch.cuda.max_memory_allocated()` over the whole timed training run (evaluation included) and "
            "`max_memory_reserved()` (what the caching allocator held, closer to `nvidia-smi`):",
            "",
        ]
        lines += _table(
            ["run", "max allocated", "max reserved"],
            [
                [
                    r["label"],
                    f"{r['trainer_max_memory_allocated'] / GB:.3f} GiB",
                    f"{r['max_memory_reserved'] / GB:.3f} GiB",
                ]
                for r in record["results"]
                if "trainer_max_memory_allocated" in r
            ],
            "lrr",
        )
        lines.append("")
    return "\n".join(lines)


def load_throughput(folder: Path = RESULTS / "throughput") -> list[dict]:
    """Saved ``benchmarks/train_throughput.py --save`` records, by machine and timer."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def render_throughput(record: dict) -> str:
    """One train_throughput.py record: tokens/s per library and precision, the ratios, the profiles."""
    m = record["machine"]
    timer = (
        "one thread, timed by the process's CPU time (what other programs on a shared machine disturb least)"
        if record["timer"] == "cpu"
        else f"{record['threads']} threads, timed by the wall clock"
    )
    lines = [
        f"### Training step against nanoGPT and Hugging Face: {m.get('cpu_kind', m['cpu'])}",
        "",
        f"torch {m['torch']}, {m['date']}, {timer}. The same training step (forward, loss, backward, fused "
        "AdamW, zero_grad) for each library at identical shapes and weights, runs alternating round by round; "
        "tokens/s from the median step. minilm runs its trainer's step (`minilm.step`, chunked loss). "
        + (
            "minilm's default on this CPU is bf16 autocast where the config asks for bf16 (small; tiny ships fp32)"
            if m.get("cpu_native_bf16")
            else "minilm's default on this CPU is fp32 (no native bf16)"
        )
        + ", compiled where a full run of the config would compile (`minilm.compile_policy`: small's 10,000 "
        "steps, not tiny's 600; the warm-up is not timed). nanoGPT's and Hugging Face's default on a CPU is "
        "fp32. *minilm before* is minilm's bf16 step without issue 17's levers (full logits through "
        "`F.cross_entropy`, attention kernel always fp32)."
        + (
            " The allocator keeps freed memory for reuse (`minilm.step.keep_cpu_heap`, as minilm's trainer "
            "sets it), process-wide: every library here ran with it."
            if record.get("keep_cpu_heap")
            else ""
        ),
        "",
        "<!-- slow: a CPU benchmark, several minutes -->",
        "```bash",
        record["command"] + " --nanogpt path/to/nanoGPT/model.py --save",
        "```",
        "",
    ]
    for name, r in record["results"].items():
        runs = r["rows"]
        default = r.get("default")
        said = f", minilm's default {default['precision']}: {default['reason']}" if default else ""
        lines += [f"**{name}** (batch {r['batch']} × seq {r['seq']}{said}):", ""]
        # (no MFU column: a one-thread matmul peak timed by CPU time came out below what the model's
        # own matmuls reached, so a share of it would mislead; the script prints it for reference)
        lines += _table(
            ["run", "tokens/s", "ms per step", "best step ms"],
            [[k, f"{v['tps']:,.0f}", f"{v['median_ms']:,.0f}", f"{v['ms']:,.0f}"] for k, v in runs.items()],
            "lrrr",
        )
        spread = max(v["median_ms"] / v["ms"] for v in runs.values()) - 1
        lines += [
            "",
            f"The median step of a run was up to {spread:.0%} slower than its best step: how much the other "
            "programs on the machine disturbed the timing (ratios within about that much of 1 are not a measured "
            "difference).",
        ]
        lines.append("")
        lines += _table(
            ["ratio of tokens/s", "median steps", "best steps"],
            [[k, f"{v:.2f}×", f"{r['best_ratios'][k]:.2f}×"] for k, v in r["ratios"].items()],
            "lrr",
        )
        lines.append("")
        if r.get("profiles"):
            names = list(r["profiles"])
            lines += [
                f"Top non-matmul operators at {name} (share of the step's profiled time, torch.profiler; "
                '"(inductor loops, other)" is all that is no aten operator: a compiled step\'s generated loops, '
                "and the Python and autograd overhead of every step):",
                "",
            ]
            depth = max(len(v) for v in r["profiles"].values())
            cells = [
                [
                    f"{r['profiles'][n][i][0]} {r['profiles'][n][i][2]:.0%}" if i < len(r["profiles"][n]) else ""
                    for n in names
                ]
                for i in range(depth)
            ]
            lines += _table(names, cells, "l" * len(names))
            lines.append("")
        if "curve_max_diff" in r:
            lines += [
                f"bf16 against fp32 over {len(r['curves']['fp32'])} steps from one initialisation: largest loss "
                f"difference {r['curve_max_diff']:.4f} nats.",
                "",
            ]
    return "\n".join(lines)


def render_throughput_summary(records: list[dict]) -> str:
    """One row per CPU kind: minilm's tokens/s over nanoGPT's and Hugging Face's, fp32 and default, per config."""
    rows = []
    for record in records:
        kind = record["machine"].get("cpu_kind", record["machine"]["cpu"])
        for name, r in record["results"].items():
            ratios = r["ratios"]
            default = r.get("default", {"precision": "bf16" if record["machine"].get("cpu_native_bf16") else "fp32"})

            def find(prefix: str, peer: str, ratios: dict = ratios) -> str:
                key = next((k for k in ratios if k.startswith(prefix) and k.endswith(f"/ {peer}")), None)
                return f"{ratios[key]:.2f}×" if key else "–"

            label = default["precision"] + (" compiled" if default.get("compile") else "")
            rows.append(
                [
                    kind,
                    f"{name} ({r['batch']} × {r['seq']})",
                    find("minilm fp32", "nanoGPT fp32"),
                    find("minilm fp32", "HF fp32"),
                    label,
                    find("minilm default", "nanoGPT default (fp32)"),
                    find("minilm default", "HF default (fp32)"),
                ]
            )
    if not rows:
        return ""
    lines = [
        "### CPU training speed per CPU kind, against nanoGPT and Hugging Face",
        "",
        "minilm's tokens/s over each library's at the same step, shapes and weights (median steps; the "
        "records below give every run). Targets (issue 17): fp32 ≥ 1.0× both, at tiny and small; on a CPU "
        "with native bf16, minilm's default ≥ 3× nanoGPT's default (fp32) at small.",
        "",
    ]
    lines += _table(
        ["CPU", "config", "fp32 / nanoGPT", "fp32 / HF", "minilm default", "default / nanoGPT", "default / HF"],
        rows,
        "llrrlrr",
    )
    return "\n".join(lines) + "\n"


def render(results: list[dict] | None = None, throughput: list[dict] | None = None) -> str:
    """The whole page."""
    results = load_results() if results is None else results
    throughput = load_throughput() if throughput is None else throughput
    measured = [render_measured(record) for record in results]
    if not results:
        measured.append("No measurements saved yet: run `python benchmarks/make_table.py`.\n")
    if throughput:
        measured.append(render_throughput_summary(throughput))
    measured += [render_throughput(record) for record in throughput]
    if not any(r["device"] != "cpu" for r in results):
        measured.append(
            "No GPU measurement is saved yet. On a machine with a CUDA GPU, `python benchmarks/make_table.py` "
            "measures every shipped config at its own settings (tokens/s, MFU against the datasheet, "
            "`max_memory_allocated`, `max_memory_reserved`) and adds a section headed with the device name.\n"
        )
    page = _fill("page.md", computed=render_computed(), measured="\n".join(measured))
    return page.rstrip("\n") + "\n"


def computed_section(text: str) -> str:
    """The computed part of a rendered page (between the markers, inclusive)."""
    start, end = text.index(COMPUTED_BEGIN), text.index(COMPUTED_END) + len(COMPUTED_END)
    return text[start:end] + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-measure", action="store_true", help="do not measure; render from saved results")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date; write nothing")
    p.add_argument("--device", help="measure on this device (default: cuda if available, else cpu)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, help="measure only these configs")
    p.add_argument("--cache-dir", help="tokenized-data cache (default: minilm's)")
    p.add_argument("--output", type=Path, default=OUTPUT)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of saved measurement records")
    args = p.parse_args(argv)

    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != render(load_results(args.results), load_throughput(args.results / "throughput")):
            print(f"{args.output} is out of date: run python benchmarks/make_table.py --no-measure", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if not args.no_measure:
        record = measure(args.device, args.cache_dir, args.configs)
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"{machine_slug(record['machine'])}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved {path}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(load_results(args.results), load_throughput(args.results / "throughput")))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
