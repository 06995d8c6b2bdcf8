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
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
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


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the module torch.compile wraps) was sharded by :func:`apply_fsdp`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed; otherwise (or when already sharded) return ``model``."""
    if not info.enabled or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_mixed_precision(cfg: Config):
    """FSDP2's policy for ``cfg``'s precision: bf16/fp16 gathered weights, fp32 gradient reduction; None in fp32.

    The sharded master weights and AdamW's state stay fp32 (as under autocast); each unit's
    gathered copy is in 16 bits, and gradients are reduced and kept in fp32.
    """
    if cfg.precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, cfg: Config, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2's ``fully_shard``: each block is a unit, the root owns the rest.

    ``reshard_after_forward=True`` frees each block's gathered weights after its forward and
    gathers them again in backward (ZeRO-3); False keeps them until the block's backward
    (ZeRO-2: more memory, one all-gather fewer per block). The module is changed in place
    (its parameters become DTensor shards): build the optimizer after this. Needs a process
    group (:func:`setup`); see :mod:`minilm.sharding` for what each rank then holds.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward}
    policy = fsdp_mixed_precision(cfg)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def no_sync(model: nn.Module, info: DistInfo) -> Callable[[], AbstractContextManager] | None:
    """A context factory that skips the gradient reduction for accumulating micro-batches (None: one process).

    DDP's ``model.no_sync``; under FSDP2 its ``set_requires_gradient_sync(False)`` (each rank
    then keeps full, unreduced gradients until the last micro-batch).
    """
    if not info.enabled:
        return None
    if not is_sharded(model):
        return model.no_sync
    root = getattr(model, "_orig_mod", model)

    @contextmanager
    def _no_sync():
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    return _no_sync


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain tensors (collective when sharded: call on every rank).

    Sharded: gathered onto rank 0's CPU (the other ranks get an empty dict), which is what the
    plain checkpoint file holds, so ``minilm sample`` reads an FSDP run's checkpoint as any other.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict; sharded: gathered (keyed by parameter name) on rank 0, collective."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options())


def load_full_model_state(model: nn.Module, model_state: dict) -> None:
    """Load a whole (unsharded) model state; sharded, each rank keeps its own shard of it.

    Every rank passes the full state (read from the same file), so a checkpoint written by
    any number of processes resumes on any other number.
    """
    if not is_sharded(model):
        model.load_state_dict(model_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, model_state, options=_state_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what :func:`full_optimizer_state` returned (every rank passes the whole of it)."""
    by_name = any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not is_sharded(model):
        optimizer.load_state_dict(_rekeyed(model, optimizer, state, to_names=False) if by_name else state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = state if by_name else _rekeyed(model, optimizer, state, to_names=True)
    set_optimizer_state_dict(model, optimizer, state, options=_state_options())


def _rekeyed(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, to_names: bool) -> dict:
    """An optimizer state dict keyed by parameter index (``Optimizer.state_dict``) as one keyed by name, or back.

    A DDP (or single-process) checkpoint numbers the parameters in the optimizer's order; an
    FSDP one names them. Rekeying lets either resume the other.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    old_keys = order if not to_names else list(range(len(order)))
    new_keys = order if to_names else list(range(len(order)))
    mapping = dict(zip(old_keys, new_keys, strict=True))
    groups = [{**g, "params": [mapping[p] for p in g["params"]]} for g in state["param_groups"]]
    return {"state": {mapping[k]: v for k, v in state["state"].items()}, "param_groups": groups}


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
    if info.enabled:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group so that the process can exit cleanly (no-op if none).

    Gloo's worker threads release a collective's tensors just *after* the collective completes.
    When a worker holds the last reference to a tensor that Python has seen (FSDP's gathered
    buffers, a state dict's full tensors), releasing it takes the GIL; if the interpreter has
    begun to shut down by then, the thread is killed inside a destructor and the whole process
    aborts with "terminate called without an active exception" (pytorch/pytorch#190489; about
    one FSDP run in ten that saved a state dict and exited at once, on a 2-core machine). So the
    main thread lets go of the GIL for a moment, in which the workers finish releasing what
    they hold. (No barrier: this also runs on the way out of a failed rank, whose peers would
    wait at it for ever.)
    """
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    time.sleep(_WORKER_RELEASE_S)


_WORKER_RELEASE_S = 0.05
