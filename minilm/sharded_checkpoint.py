"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shard.

A whole-model checkpoint (what :mod:`minilm.checkpoint` writes) gathers every weight and
AdamW moment onto rank 0 first: fine for teaching models, impossible when the model state
does not fit one process. DCP instead has each rank write the pieces it holds, in parallel,
plus one ``.metadata`` file saying which piece of which tensor is where, so that a later run
on **any number of processes** (one included, without a process group) reads back exactly
the pieces it needs: resuming on 2 GPUs a run trained on 4 is a plain load.

    save_sharded(out, step, model, optimizer, training_state=..., config=cfg)   # every rank
    step = load_sharded(out / f"checkpoint-{step}", model, optimizer)            # every rank, any world size
    export_plain(out / f"checkpoint-{step}", "outputs/exported")                 # one process: one plain file

A sharded checkpoint is a ``checkpoint-N`` folder like any other (:mod:`minilm.checkpoint`:
written under a temporary name, a SHA-256 manifest over every file, one atomic rename,
rotation, ``latest``), with ``dcp/`` in place of ``model.safetensors``::

    checkpoint-600/
        dcp/.metadata        which piece of which tensor is in which file (DCP's index)
        dcp/__R_0.distcp     rank R's shards: its weights and AdamW moments (tensors only)
        training_state.pt    AdamW's param_groups, scaler, RNG, sampler position, counters (rank 0)
        config.json, tokenizer/, manifest.json   as in a whole-model checkpoint

**Tensors only.** DCP unpickles its ``.metadata`` and any non-tensor entry with
``weights_only=False``; minilm stores only tensors in ``dcp/`` (the optimizer's plain
hyperparameters go to ``training_state.pt``, read with ``weights_only=True``), reads
``.metadata`` with an unpickler that accepts DCP's own record types only, and refuses a
``dcp/`` folder holding anything else. Every file is checked against the manifest first.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minilm import checkpoint as ckpt_io
from minilm.checkpoint import SHARDED_DIR, CheckpointError
from minilm.config import Config

GROUPS_KEY = "optimizer_param_groups"  # in training_state.pt: AdamW's hyperparameters, by parameter name


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (collective when a process group exists)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _from_rank0(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _failures(e: CheckpointException) -> str:
    """What DCP's exception says failed, one line per rank (its own message is whole tracebacks)."""
    return "; ".join(f"rank {r}: {ckpt_io._first_line(exc)}" for r, (exc, _) in e.failures.items())


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """DCP's read failures (a BaseException) as one :class:`CheckpointError` naming the checkpoint."""
    try:
        yield
    except CheckpointException as e:
        raise CheckpointError(f"{path}: cannot read its shards ({_failures(e)}): use an older checkpoint") from None


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list | None]:
    """(what DCP stores: the model's and AdamW's tensors, keyed by parameter name; AdamW's param_groups)."""
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    if optimizer is None:
        return {"model": model_sd}, None
    return {"model": model_sd, "optim": optim_sd["state"]}, optim_sd["param_groups"]


def save_sharded(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    training_state: dict[str, Any],
    config: Config,
    tokenizer: Any | None = None,
    save_total_limit: int = 0,
    stale_steps: Collection[int] = (),
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` as a sharded checkpoint; call on every rank (collective).

    Each rank writes its own shard of ``model`` (and ``optimizer``) into one temporary folder
    (on a file system all ranks share); rank 0 adds ``training_state`` (plain values and
    tensors: scaler, RNG, sampler...), the config and tokenizer, and once every rank has
    finished, the manifest and the rename (:func:`minilm.checkpoint.publish_checkpoint`).
    Raises :class:`~minilm.checkpoint.CheckpointError` on every rank if any rank failed.
    """
    main = _rank() == 0
    final = ckpt_io.checkpoint_path(output_dir, step)
    made: tuple[str | None, str | None] = (None, None)  # (temporary folder, error)
    if main:
        try:  # rank 0 makes the folder; the others wait for its name, so a failure must reach them
            made = (str(ckpt_io.new_checkpoint_folder(output_dir, step)), None)
        except OSError as e:
            made = (None, f"{final}: could not create a temporary folder beside it ({e})")
    folder, failure = _from_rank0(made)
    if failure is not None:
        raise CheckpointError(failure)
    tmp = Path(folder)
    error: CheckpointError | None = None
    try:
        state, groups = _tensor_state(model, optimizer)
        with ckpt_io.write_errors(final):
            with warnings.catch_warnings():  # one process without a process group is a supported way to save
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                dcp.save(state, storage_writer=FileSystemWriter(tmp / SHARDED_DIR))
            if main:
                extra = {} if groups is None else {GROUPS_KEY: groups}
                ckpt_io.write_state_files(tmp, step, {**training_state, **extra}, config, tokenizer)
    except CheckpointException as e:  # DCP's (a BaseException): every rank gets it, naming the ranks that failed
        error = CheckpointError(
            f"{final}: could not write the shards ({_failures(e)}); a full disk is the usual cause: free space or "
            "choose another --output_dir on a file system all ranks share (the checkpoints already saved are intact)"
        )
    except CheckpointError as e:
        error = e
    if _any_rank(error is not None):  # every rank's shard is written before the folder gets its name
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or CheckpointError(f"{final}: another process could not write its shard (see its error)")
    if main:
        try:
            final = ckpt_io.publish_checkpoint(tmp, step, save_total_limit=save_total_limit, stale_steps=stale_steps)
        except CheckpointError as e:
            error = e
    if _any_rank(error is not None):  # also the barrier: nobody reads the checkpoint before it has its name
        raise error or CheckpointError(f"{final}: rank 0 could not finish the checkpoint (see its error)")
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index, refusing any class but DCP's records and torch's plain types."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.strided and the like, by name (weights_only allows it too)
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),  # where each rank's file was written
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format)
        if module.startswith(self._ALLOWED_MODULES) or (module, name) in self._ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: not part of a DCP index")


def read_index(dcp_dir: Path):
    """DCP's ``.metadata`` index of ``dcp_dir``, unpickled safely; raises :class:`CheckpointError` naming the file.

    Refuses an index that lists non-tensor entries: DCP would unpickle those with code execution.
    """
    path = dcp_dir / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        entries = metadata.state_dict_metadata.items()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable DCP index ({type(e).__name__}: {e})") from None
    bad = [k for k, v in entries if isinstance(v, BytesStorageMetadata)]
    if bad:
        raise CheckpointError(
            f"{path}: holds non-tensor entries ({', '.join(bad[:3])}), which would be unpickled with code "
            "execution; minilm writes tensors only: this folder was not written by minilm"
        )
    return metadata


class _TensorsOnlyReader(FileSystemReader):
    """DCP's file reader, its index read by :func:`read_index` (DCP's own reader unpickles anything)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = read_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _groups(ck: ckpt_io.Checkpoint) -> list:
    if GROUPS_KEY not in ck.training_state:
        raise CheckpointError(f"{ck.path}: saved without optimizer state, cannot resume an optimizer from it")
    return ck.training_state[GROUPS_KEY]


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``), resharding as needed; returns its step.

    Every rank calls it. Works at any world size: FSDP models read just their own shards, a
    plain model in one process reads whole tensors. The files are first checked against the
    manifest (:func:`minilm.checkpoint.check_checkpoint` names a damaged one).
    """
    ck = ckpt_io.load_checkpoint(path, weights=False)
    if not ck.sharded:
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDED_DIR}/ folder)")
    load_into(ck, model, optimizer)
    return ck.step


def load_into(ck: ckpt_io.Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read the shards of ``ck`` (loaded with ``weights=False``: already verified) into ``model`` and ``optimizer``."""
    read_index(ck.path / SHARDED_DIR)  # a clean error here: DCP would retry a refused index under another name
    state, _ = _tensor_state(model, optimizer)
    with warnings.catch_warnings():
        # One process without a process group is a supported way to read: DCP says so in a warning.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        with _read_errors(ck.path):
            dcp.load(state, storage_reader=_TensorsOnlyReader(ck.path / SHARDED_DIR))
    optim_sd = {"state": state["optim"], "param_groups": _groups(ck)} if optimizer is not None else {}
    opt = optimizer if optimizer is not None else []
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=optim_sd)


def read_whole(path: str | Path, param_groups: list | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(whole model state, whole optimizer state or None) of a sharded checkpoint, read by this process alone.

    No collectives (safe inside a process group); the optimizer state, keyed by parameter name,
    is built when ``param_groups`` (from ``training_state.pt``) is given and ``dcp/`` holds one.
    Call after :func:`minilm.checkpoint.check_checkpoint`.
    """
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    state: dict[str, Any] = {}
    read_index(Path(path) / SHARDED_DIR)  # a clean error here: DCP would retry a refused index under another name
    reader = _TensorsOnlyReader(Path(path) / SHARDED_DIR)
    with _read_errors(Path(path)):
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    optim = None
    if param_groups is not None and "optim" in state:
        optim = {"state": state["optim"], "param_groups": param_groups}
    return state["model"], optim


def export_plain(path: str | Path, output_dir: str | Path) -> Path:
    """One process: a sharded checkpoint's weights as a whole-model checkpoint ``output_dir/checkpoint-{step}``.

    The result (safetensors weights, config with world_size 1, the tokenizer) is what any
    minilm version reads; ``minilm sample`` and the Hugging Face converter also read the
    sharded folder itself.
    """
    from minilm.tokenizer import load_tokenizer

    ck = ckpt_io.load_checkpoint(path, training_state=False)
    if not ck.sharded:
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDED_DIR}/ folder): it is already plain")
    return ckpt_io.save_checkpoint(
        output_dir,
        ck.step,
        model_state=ck.model_state,
        training_state={},
        config=ck.config.replace(world_size=1, parallelism="ddp"),
        tokenizer=load_tokenizer(ck.tokenizer_dir) if ck.tokenizer_dir else None,
    )
