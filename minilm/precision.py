"""Mixed precision in one switch: which autocast dtype a run uses, from the config and the hardware.

    >>> from minilm.precision import autocast_dtype, autocast_context
    >>> dtype = autocast_dtype(cfg, device)    # torch.bfloat16, torch.float16, or None for plain fp32
    >>> ctx = autocast_context(device, dtype)  # nullcontext() when dtype is None
    >>> scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only
    >>> with ctx:
    ...     logits, loss = model(x, y)

The rules (:func:`autocast_dtype`):

- ``bf16: true`` or ``fp16: true`` on a CPU: bfloat16 autocast where the CPU multiplies bf16
  natively (AVX512-BF16 or AMX on x86, the BF16 extension on Arm), about 2-4x the fp32 matmul
  rate; plain fp32 elsewhere, where emulated bf16 would be slower. fp16 becomes bf16 on CPU:
  no CPU we target has fast fp16 matmuls, and bf16 needs no gradient scaler.
- ``bf16: true`` on a GPU: bfloat16 where the GPU supports it (Ampere and newer), else
  float16 (with a gradient scaler: check ``dtype == torch.float16``).
- ``fp16: true`` on a GPU: float16.
- Apple GPUs (``device: mps``), as far as the installed PyTorch supports them
  (:func:`mps_autocast_dtypes`): float16 autocast needs PyTorch 2.8 (autocast came in 2.5, the
  gradient scaler on MPS in 2.8); bfloat16 autocast needs PyTorch 2.6 and macOS 14. ``fp16``
  gives float16, else bfloat16; ``bf16`` gives bfloat16, else float16; neither available: fp32.
  (Written from PyTorch's release notes and tested with stand-ins; never run on a Mac.)
- neither: None (fp32).

``cpu_bf16=True`` overrides the CPU check and runs bf16 autocast on any CPU: emulated where
not native, several times slower than fp32 (7x for the tiny config on an AVX2 CPU, measured),
and not bit-identical to native bf16 (products are summed in another order). Tests use it
to exercise the bf16 path on any machine; ``cpu_bf16=False`` keeps a CPU in fp32.

Parameters, gradients and optimizer state stay fp32 under autocast; only the matmuls (and
the activations they produce) drop to 16 bits.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minilm.config import Config


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (so bf16 autocast is faster than fp32)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    if machine in ("aarch64", "arm64"):
        try:  # Linux lists the Arm BF16 extension among the CPU features
            return any(
                line.startswith("Features") and "bf16" in line.split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
        except OSError:  # macOS and others: no /proc; stay with fp32
            return False
    return False


# The first PyTorch versions with each MPS autocast dtype (pytorch/pytorch#99272 fp16 autocast in
# 2.5 and its GradScaler in 2.8; #139390 bf16 autocast in 2.6, which also needs macOS 14).
MPS_FP16_TORCH = (2, 8)
MPS_BF16_TORCH = (2, 6)


def mps_autocast_dtypes(torch_version: str | None = None) -> tuple[torch.dtype, ...]:
    """The autocast dtypes minilm trains with on an Apple GPU, given this PyTorch (and macOS for bf16)."""
    from torch.torch_version import TorchVersion

    version = TorchVersion(torch_version or torch.__version__)
    found = []
    if version >= MPS_BF16_TORCH and _macos_at_least(14):
        found.append(torch.bfloat16)
    if version >= MPS_FP16_TORCH:
        found.append(torch.float16)
    return tuple(found)


def _macos_at_least(major: int) -> bool:
    try:  # raises off a Mac ("without MPS backend")
        return bool(torch.backends.mps.is_macos_or_newer(major, 0))
    except (AttributeError, RuntimeError):
        return False


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast_dtype(cfg: Config, device: torch.device | str, cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``cfg`` on ``device``: bf16, fp16, or None for plain fp32 (rules above).

    ``cpu_bf16``: on a CPU, None asks :func:`cpu_supports_bf16`; True runs bf16 autocast
    anyway (emulated if need be); False runs fp32. It has no effect on other devices.
    """
    kind = _device_type(device)
    wanted = cfg.bf16 or cfg.fp16
    if not wanted:
        return None
    if kind == "cpu":
        native = cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if native else None
    if kind == "cuda":
        if cfg.fp16:
            return torch.float16
        # including_emulation=False: a V100 or T4 can hold bf16 tensors (the default check says
        # True) but has no bf16 tensor cores; fp16 with a scaler is the fast, supported path there.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if kind == "mps":
        supported = mps_autocast_dtypes()
        preferred = (torch.float16, torch.bfloat16) if cfg.fp16 else (torch.bfloat16, torch.float16)
        return next((d for d in preferred if d in supported), None)
    return torch.bfloat16 if cfg.bf16 else torch.float16  # other accelerators: as asked


def requested_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype the config asks for, whatever the hardware: bf16, fp16, or None (fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a do-nothing context for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=dtype)


def describe_precision(cfg: Config, device: torch.device | str, cpu_bf16: bool | None = None) -> str:
    """One line for the log: what runs, and why (e.g. a bf16 request on a CPU without bf16)."""
    dtype = autocast_dtype(cfg, device, cpu_bf16)
    kind = _device_type(device)
    asked = cfg.precision
    if dtype is None:
        if asked == "fp32":
            return "fp32"
        if kind == "mps":
            return (
                f"fp32 ({asked} requested, but PyTorch {torch.__version__} on this Mac has no {asked} autocast on MPS: "
                f"fp16 needs PyTorch {'.'.join(map(str, MPS_FP16_TORCH))}, bf16 PyTorch "
                f"{'.'.join(map(str, MPS_BF16_TORCH))} and macOS 14)"
            )
        if cpu_bf16 is False:
            return f"fp32 ({asked} requested, but cpu_bf16=False keeps this CPU in fp32)"
        return f"fp32 ({asked} requested, but this CPU has no native bf16 matmul: fp32 is faster here)"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    emulated = " (emulated: this CPU has no native bf16, so it is slower than fp32)"
    note = emulated if kind == "cpu" and cpu_bf16 and not cpu_supports_bf16() else ""
    if name != asked:
        return f"{name} autocast ({asked} requested; {kind} runs {name}){note}"
    return f"{name} autocast{note}"


def mixed_precision(
    cfg: Config, device: torch.device, cpu_bf16: bool | None = None
) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler, str]:
    """The precision switch: (context to run forward passes in, gradient scaler, description).

    fp32: ``nullcontext()``; bf16 / fp16: ``torch.autocast`` (:func:`autocast_dtype` picks the
    dtype from the config and the hardware). The scaler multiplies the loss before backward
    so small fp16 gradients do not underflow, and skips steps whose gradients overflowed; it
    is a pass-through for anything but fp16.
    """
    dtype = autocast_dtype(cfg, device, cpu_bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    name = describe_precision(cfg, device, cpu_bf16) + (" + gradient scaler" if scaler.is_enabled() else "")
    return autocast_context(device, dtype), scaler, name
