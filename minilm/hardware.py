"""Known accelerators' peak FLOP/s and memory, and a quick measurement of this machine's matmul peak.

Peaks are **dense** (no 2:4 structured sparsity: datasheets often print the sparse figure,
twice the dense one, with an asterisk) and come from the vendors' datasheets and
architecture whitepapers. They are the numbers MFU divides by. GeForce cards are listed
with fp32 accumulation (what PyTorch uses), which on those cards runs at half the
fp16-accumulate rate the marketing figure quotes.

    >>> from minilm.hardware import ACCELERATORS, peak_flops, register_accelerator, Accelerator
    >>> peak_flops("H100 SXM", "bf16")
    989400000000000.0
    >>> register_accelerator(Accelerator("My GPU", memory_gb=48, bf16=362e12, fp16=362e12, fp32=91.6e12))
    >>> measure_matmul_flops()   # this machine, fp32, a few tenths of a second
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from minilm.formatting import render_table


@dataclass(frozen=True)
class Accelerator:
    """One device. FLOP/s are dense peaks; None where the device has no such mode."""

    name: str
    memory_gb: float  # device memory as the vendor states it (these "GB" are GiB in practice)
    bf16: float | None  # tensor-core bf16, fp32 accumulate
    fp16: float | None  # tensor-core fp16, fp32 accumulate
    fp32: float | None  # plain fp32 (no TF32): PyTorch's default for fp32 matmuls
    tf32: float | None = None  # TF32 tensor cores, if allow_tf32 / set_float32_matmul_precision("high")
    source: str = "vendor datasheet, dense (no sparsity)"

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for 'bf16', 'fp16', 'fp32' or 'tf32'; raises if the device has none."""
        value = getattr(self, _dtype_key(dtype))
        if value is None:
            raise ValueError(f"{self.name} has no {dtype} peak (not supported by the hardware)")
        return value


def _dtype_key(dtype: str) -> str:
    key = dtype.lower().replace("float", "fp").replace("bfloat", "bf").replace("bfp", "bf")
    if key not in ("bf16", "fp16", "fp32", "tf32"):
        raise ValueError(f"dtype must be 'bf16', 'fp16', 'fp32' or 'tf32', got {dtype!r}")
    return key


T = 1e12
_DATASHEET = "vendor datasheet, dense (no sparsity)"
_WHITEPAPER = "vendor architecture whitepaper, dense (no sparsity), fp32 accumulate"
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in [
        Accelerator("H200 SXM", 141, bf16=989.4 * T, fp16=989.4 * T, fp32=67 * T, tf32=494.7 * T, source=_DATASHEET),
        Accelerator("H100 SXM", 80, bf16=989.4 * T, fp16=989.4 * T, fp32=67 * T, tf32=494.7 * T, source=_DATASHEET),
        Accelerator("H100 PCIe", 80, bf16=756.5 * T, fp16=756.5 * T, fp32=51 * T, tf32=378 * T, source=_DATASHEET),
        Accelerator("A100 80GB", 80, bf16=312 * T, fp16=312 * T, fp32=19.5 * T, tf32=156 * T, source=_DATASHEET),
        Accelerator("A100 40GB", 40, bf16=312 * T, fp16=312 * T, fp32=19.5 * T, tf32=156 * T, source=_DATASHEET),
        Accelerator("L4", 24, bf16=121 * T, fp16=121 * T, fp32=30.3 * T, tf32=60 * T, source=_DATASHEET),
        Accelerator("RTX 4090", 24, bf16=165.2 * T, fp16=165.2 * T, fp32=82.6 * T, tf32=82.6 * T, source=_WHITEPAPER),
        Accelerator("RTX 3090", 24, bf16=71 * T, fp16=71 * T, fp32=35.6 * T, tf32=35.6 * T, source=_WHITEPAPER),
        Accelerator("V100 SXM2", 32, bf16=None, fp16=125 * T, fp32=15.7 * T, source=_DATASHEET),
        Accelerator("T4", 16, bf16=None, fp16=65 * T, fp32=8.1 * T, source=_DATASHEET),
    ]
}


def register_accelerator(acc: Accelerator, *, overwrite: bool = False) -> None:
    """Add a device to :data:`ACCELERATORS` (raises if the name exists, unless ``overwrite``)."""
    if acc.name in ACCELERATORS and not overwrite:
        raise ValueError(f"{acc.name!r} is already registered; pass overwrite=True to replace it")
    ACCELERATORS[acc.name] = acc


def get_accelerator(name: str) -> Accelerator:
    """Look a device up by name, ignoring case, spaces and dashes ('h100-sxm' finds 'H100 SXM')."""

    def norm(s: str) -> str:
        return s.lower().replace(" ", "").replace("-", "").replace("_", "")

    for key, acc in ACCELERATORS.items():
        if norm(key) == norm(name):
            return acc
    raise KeyError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)} (add one: register_accelerator)")


def peak_flops(name: str, dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of a known device for 'bf16', 'fp16', 'fp32' or 'tf32'."""
    return get_accelerator(name).peak(dtype)


def accelerator_table(fmt: str = "text") -> str:
    """The table of known devices (TFLOP/s, dense), as text or markdown."""
    head = ["device", "memory GB", "bf16", "fp16", "tf32", "fp32"]

    def tf(x: float | None) -> str:
        return "-" if x is None else f"{x / T:g}"

    rows = [[a.name, f"{a.memory_gb:g}", tf(a.bf16), tf(a.fp16), tf(a.tf32), tf(a.fp32)] for a in ACCELERATORS.values()]
    note = "peak TFLOP/s, dense (no sparsity), from vendor datasheets and whitepapers"
    return render_table(head, rows, fmt, note=note.capitalize() + "." if fmt == "markdown" else note)


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    device: str | torch.device = "cpu",
    min_seconds: float = 0.2,
    seed: int = 0,
) -> float:
    """This machine's achieved FLOP/s on square ``size`` × ``size`` matmuls: a practical peak.

    Runs matmuls for at least ``min_seconds`` after one warm-up and returns the best
    repetition's rate (2·n³ FLOPs per matmul). A real peak for MFU on a CPU, where no
    datasheet number applies; on a GPU it shows how close a large matmul gets to the datasheet.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: thread pools, kernel selection
    sync()
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * size**3 / best


# CUDA device names of the cards in ACCELERATORS, without vendor words ('NVIDIA',
# 'Tesla', 'GeForce') and memory ('80GB', 'HBM3'). Only these exact models map: a variant of the same
# chip (H100 NVL, V100 PCIe, RTX 4090 D, a laptop GPU, a MIG slice) has other peaks than the listed
# card, so it gets None and the trainer measures its peak instead of dividing by a wrong one.
_DATASHEET_NAMES = {
    "H200": "H200 SXM",  # 'NVIDIA H200'
    "H100": "H100 SXM",  # 'NVIDIA H100 80GB HBM3'
    "H100 PCIE": "H100 PCIe",
    "A100": "A100",  # the three A100 forms share their peaks; 40GB or 80GB by memory, below
    "A100 SXM4": "A100",
    "A100 PCIE": "A100",
    "L4": "L4",
    "RTX 4090": "RTX 4090",
    "RTX 3090": "RTX 3090",
    "V100 SXM2": "V100 SXM2",  # the PCIe V100 runs at lower clocks: not this entry
    "T4": "T4",
}
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE"}


def datasheet_name(gpu_name: str) -> str | None:
    """The :data:`ACCELERATORS` entry for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100 SXM'.

    None for any card that is not exactly a listed one (see ``_DATASHEET_NAMES``).
    """
    words = re.split(r"[\s_-]+", gpu_name.upper().strip())
    memory = [w for w in words if re.fullmatch(r"\d+GB", w)]
    model = " ".join(w for w in words if w not in _VENDOR_WORDS and not re.fullmatch(r"\d+GB|HBM\w*", w))
    name = _DATASHEET_NAMES.get(model)
    if name == "A100":
        return "A100 80GB" if "80GB" in memory else "A100 40GB"
    return name


def device_peak_flops(device: torch.device, dtype: torch.dtype | None) -> tuple[float | None, str]:
    """One device's dense peak FLOP/s at the precision the matmuls run in, and where the figure comes from.

    A GPU in :data:`ACCELERATORS` uses its datasheet peak; any other GPU is
    measured on the spot (a large matmul, a fraction of a second). CPUs: (None, ''): their
    practical peak depends on what else runs, so the trainer reports tokens/s and FLOP/s only.
    """
    if device.type != "cuda":
        return None, ""
    precision_key = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = datasheet_name(torch.cuda.get_device_name(device))
    if name is not None:
        return peak_flops(name, precision_key), f"{name} {precision_key} datasheet peak"
    measured = measure_matmul_flops(dtype or torch.float32, size=4096, device=device)
    return measured, f"measured {precision_key} matmul peak"
