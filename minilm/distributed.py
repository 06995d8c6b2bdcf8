"""Data-parallel training under ``torchrun``: one process per device, gradients averaged.

    torchrun --nproc_per_node=4 train.py --config configs/training/large_model.json
    torchrun --nproc_per_node=2 train.py --config configs/training/tiny_model.json --world_size 2 --device cpu

``torchrun`` starts N copies of the script and tells each one who it is through
environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). Each process builds the same model from the same seed, reads its own
disjoint share of every global batch, and ``DistributedDataParallel`` averages the
gradients across processes during ``backward()``: after one step every copy holds the
same weights as a single process trained on the whole global batch would.

The backend is NCCL between GPUs and Gloo between CPU processes. Only rank 0 prints,
writes metrics and saves checkpoints. The config's ``world_size`` must equal the number
of processes the launcher started, so a config states how it is meant to be run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minilm.config import Config, ConfigError, check_field


@dataclass(frozen=True)
class DistInfo:
    """Who this process is. ``enabled`` is False for a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and saves."""
        return self.rank == 0


def launcher_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (or another launcher), or None when not launched that way."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def check_world_size(cfg: Config) -> None:
    """Raise :class:`ConfigError` when the config's ``world_size`` and the launcher disagree."""
    launched = launcher_world_size()
    if launched is None:
        if cfg.world_size > 1:
            raise ConfigError(
                f"field 'world_size' is {cfg.world_size} but this is a single process: launch with "
                f"'torchrun --nproc_per_node={cfg.world_size} train.py ...', or pass --world_size 1"
            )
        return
    if launched != cfg.world_size:
        raise ConfigError(
            f"field 'world_size' is {cfg.world_size} but the launcher started {launched} processes "
            f"(WORLD_SIZE={launched}): pass --world_size {launched}, or run "
            f"'torchrun --nproc_per_node={cfg.world_size} ...'"
        )


def setup(cfg: Config, device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun; a no-op for a single process.

    ``device`` is where this process computes: for CUDA the caller passes ``cuda:LOCAL_RANK``
    (see :func:`local_device`). Raises :class:`ConfigError` on a world-size mismatch.
    """
    check_world_size(cfg)
    if launcher_world_size() is None:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=dist.get_world_size(), enabled=True)


def mps_available() -> bool:
    """True on a Mac whose PyTorch can use the Apple GPU (the MPS backend); False everywhere else."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def local_device(requested: str) -> torch.device:
    """The device this process should use: ``requested`` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps') resolved.

    'auto' picks CUDA, else an Apple GPU (MPS), else the CPU. Under torchrun with CUDA every
    process takes the GPU numbered by its LOCAL_RANK. MPS is one GPU per Mac with no
    process-group backend of its own, so it is refused under a launcher.
    """
    check_field("device", requested)  # 'gpu' and other typos: a ConfigError naming the field, not a torch error
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    device = torch.device(requested)
    if device.type == "mps":
        if not mps_available():
            raise ConfigError(
                "field 'device' is 'mps' but no Apple GPU is available (MPS needs a Mac with Apple silicon "
                "or an AMD GPU, and a PyTorch built with MPS): use --device cpu"
            )
        if launcher_world_size() is not None:
            raise ConfigError(
                "field 'device' is 'mps' but this is a torchrun process: data-parallel training on Apple GPUs "
                "is not supported (one Mac has one GPU); run a single process, or use --device cpu"
            )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"field 'device' is {requested!r} but no CUDA GPU is available: use --device cpu")
        if launcher_world_size() is not None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed; otherwise return ``model`` unchanged."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes, in place (unchanged for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s Python object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call twice)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
