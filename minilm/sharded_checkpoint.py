"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shard.

A whole-model checkpoint (what :mod:`minilm.checkpoint` writes) gathers every weight and
AdamW moment onto rank 0 first: fine for teaching models, impossible when the model state
does not fit one process. DCP instead has each rank write the pieces it holds, in parallel,
plus one ``.metadata`` file saying which piece of which tensor is where, so that a later run
on **any number of processes** (one included, without a process group) reads back exactly
the pieces it needs: resuming on 2 GPUs a run trained on 4 is a plain load.

    save_sharded(path, model, optimizer, step=step, config=cfg)   # every rank
    step = load_sharded(path, model, optimizer)                   # every rank, any world size
    export_plain(path, "outputs/exported")                        # one process: a file `minilm sample` reads

Layout of ``path``: ``dcp/`` (DCP's shards and metadata), ``config.json`` and ``meta.json``
(the step). It is written under a temporary name and renamed by rank 0 once every rank has
finished, so a crash mid-save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minilm.config import Config, load_config

DCP_DIR, CONFIG_FILE, META_FILE = "dcp", "config.json", "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int, config: Config
) -> Path:
    """Write ``model`` (and ``optimizer``) as a DCP checkpoint at ``path``; call on every rank."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, **({"optim": optim_sd} if optimizer is not None else {})}
    dcp.save(state, checkpoint_id=tmp / DCP_DIR)
    if _rank() == 0:
        config.save(tmp / CONFIG_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, "optimizer": optimizer is not None}))
    _barrier()  # every rank's shard is written before the folder gets its final name
    if _rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    _barrier()
    return path


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), resharding as needed.

    Works at any world size: sharded models (FSDP) read their shards, a plain model in one
    process reads whole tensors. Returns the checkpoint's step.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a sharded checkpoint (no {META_FILE})")
    meta = json.loads(meta_file.read_text())
    if optimizer is not None and not meta["optimizer"]:
        raise ValueError(f"{path}: saved without optimizer state, cannot resume an optimizer from it")
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, **({"optim": optim_sd} if optimizer is not None else {})}
    with warnings.catch_warnings():
        # One process without a process group is a supported way to read: DCP says so in a warning.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path / DCP_DIR)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return int(meta["step"])


def export_plain(path: str | Path, output_dir: str | Path, tokenizer=None) -> Path:
    """One process: read a sharded checkpoint's weights into a plain GPT and write a regular checkpoint.

    The result is ``output_dir/checkpoint-{step}``, written by :func:`minilm.checkpoint.save_checkpoint`
    (atomic, checksummed), which ``minilm sample`` and the Hugging Face converter read.
    ``tokenizer`` (with a ``save(folder)`` method) is stored beside it for sampling.
    """
    from minilm import checkpoint as ckpt_io
    from minilm.model import GPT

    path = Path(path)
    cfg = load_config(path / CONFIG_FILE, check_estimate=False)
    model = GPT(cfg.replace(world_size=1))
    step = load_sharded(path, model)
    return ckpt_io.save_checkpoint(
        output_dir,
        step,
        model_state=model.state_dict(),
        training_state={},
        config=cfg.replace(world_size=1, parallelism="ddp"),
        tokenizer=tokenizer,
    )
