"""One optimizer step, in three named parts: gradients, clipping, update.

The trainer runs these, and so does :mod:`minilm.measure` when it checks the memory
estimate, so the estimate is validated against the step that trains, not a copy of it.

1. :func:`accumulate_gradients`: for each of k micro-batches, forward under the precision
   context and backward of ``loss / k`` (the summed gradient is that of the mean loss);
   under DDP only the last backward all-reduces.
2. :func:`clip_gradients`: unscale (fp16 only) and clip the global gradient norm.
3. :func:`optimizer_step`: AdamW (fp16: skipped by the scaler on overflow), then zero grads.

The trainer checks the loss and the norm between 2 and 3, so a non-finite step never
changes the weights.

On a CPU, :func:`accumulate_gradients` first calls :func:`keep_cpu_heap` (once per process):
glibc's allocator otherwise hands the step's large temporaries back to the kernel when they
die and page-faults them in afresh on the next step.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def _no_phase(phase: str) -> None:
    pass


# glibc's mallopt parameters (malloc.h) and the values keep_cpu_heap sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
CPU_MMAP_THRESHOLD = 256 * 2**20  # bytes: blocks up to this come from the reusable heap, not fresh mmaps
CPU_TRIM_THRESHOLD = 2**30  # bytes of free heap top kept rather than returned to the kernel


@functools.cache
def keep_cpu_heap() -> bool:
    """Keep freed CPU tensor memory in the process's heap, so the next step reuses it (glibc only).

    Each training step allocates and frees the same large temporaries (autocast's bf16 weight
    copies, activations, the loss's chunk of logits). glibc's defaults serve blocks above a
    sliding threshold (at most 32 MiB) with fresh ``mmap`` calls and return free heap tops to
    the kernel, so the next step page-faults the same memory in again, zero-filled by the
    kernel. Measured on the small config at batch 4 x 256 in bf16 (one thread, 2-core Xeon with
    AMX): ~75,000 page faults and ~200 ms of system time per ~1.2 s step; with this, none. (On
    another VM of that kind, freeing and reallocating 96 + 16 MiB still took ~16,400 faults per
    round with this, 24,600 without: the blocks stayed in the heap, glibc's accounting shows,
    but that kernel took their pages back. What it saves depends on the kernel.)
    The price: memory freed after the peak stays with the process (its resident size stays
    near the peak instead of shrinking between steps). Process-wide; applied once; returns
    whether glibc accepted both settings (False on other C libraries, which are left alone).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD))


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    autocast: AbstractContextManager,
    scaler: torch.amp.GradScaler,
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    keep_logits: bool = False,
    chunked_loss: bool = False,
    set_phase: Callable[[str], None] = _no_phase,
) -> torch.Tensor:
    """Forward and backward over ``micro_batches``; gradients accumulate in ``.grad``.

    ``no_sync``: DDP's ``model.no_sync``, entered for every micro-batch but the last, so the
    gradient all-reduce runs once. ``chunked_loss=True`` (the trainer's choice) computes the loss
    a chunk of positions at a time (:mod:`minilm.loss`), so the (B, T, V) logits never exist;
    ``keep_logits=True`` holds them through backward, as ``logits, loss = model(x, y)`` in a
    user's loop does (the memory lesson measures the difference). ``set_phase`` is told
    'forward' / 'backward' (memory tracing).
    Returns this rank's mean loss over the micro-batches: a detached fp32 scalar on the
    device (reading it is a host synchronisation, left to the caller).
    """
    k = len(micro_batches)
    if micro_batches[0][0].device.type == "cpu":
        keep_cpu_heap()
    total = torch.zeros((), device=micro_batches[0][0].device)
    logits = None  # with keep_logits, like a user's variable: alive until the next forward replaces it
    for i, (x, y) in enumerate(micro_batches):
        sync = no_sync() if (no_sync is not None and i < k - 1) else nullcontext()
        with sync:
            set_phase("forward")
            with autocast:
                if keep_logits:
                    logits, loss = model(x, y)
                elif chunked_loss:
                    loss = model(x, y, return_logits=False)[1]
                else:  # index the tuple: nothing holds the logits once the loss exists
                    loss = model(x, y)[1]
            set_phase("backward")
            scaler.scale(loss / k).backward()
        total += loss.detach().float()
        del loss
    del logits
    return total / k


def clip_gradients(
    parameters: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float
) -> torch.Tensor:
    """Unscale (fp16 only) and clip the global gradient norm to ``max_norm`` (0: no clipping).

    Returns the norm before clipping, as a device scalar (no host synchronisation).
    """
    scaler.unscale_(optimizer)  # no-op unless fp16: clipping must see the true gradients
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of per-shard partial norms; the whole norm, on every rank
        norm = norm.full_tensor()
    return norm


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """AdamW step (fp16: skipped by the scaler when gradients overflowed), then zero the gradients."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
