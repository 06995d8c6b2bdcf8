"""A training run's checkpoints: what one holds besides the weights, how a Trainer writes it and resumes from it.

The files themselves (safetensors weights, checksums, atomic folders, rotation) are
:mod:`minilm.checkpoint`'s; this module decides *what* goes in them so that a resumed run
continues bit for bit: optimizer, gradient scaler, RNG, the sampler's position, counters.

Under FSDP with several processes (``checkpoint_format`` 'auto') every rank writes its own shard
(:mod:`minilm.sharded_checkpoint`) instead of gathering the model onto rank 0. Either kind
resumes at any world size; see :func:`world_size_note` for what is then exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from minilm import checkpoint as ckpt_io
from minilm import distributed as dist_utils
from minilm import runs
from minilm import sharded_checkpoint as sharded
from minilm.checkpoint import CheckpointError
from minilm.config import Config

if TYPE_CHECKING:
    from minilm.trainer import Trainer


def training_state(tr: Trainer) -> dict[str, Any]:
    """Optimizer, scaler, RNG, sampler position and counters: what a checkpoint needs besides weights."""
    # Sharded: each rank writes its own AdamW shard (save), nothing is gathered here.
    optimizer = {} if writes_shards(tr) else {"optimizer": dist_utils.full_optimizer_state(tr.raw_model, tr.optimizer)}
    return {
        **optimizer,
        "scaler": tr.scaler.state_dict(),
        "rng": ckpt_io.rng_state(tr.device),
        "sampler": tr.sampler.state_dict(),
        "tokens_seen": tr.tokens_seen,
        "tokenizer_fingerprint": tr.tokenizer.fingerprint,
    }


def writes_shards(tr: Trainer) -> bool:
    """Whether this run saves sharded checkpoints: format 'sharded', or 'auto' under FSDP with >1 process."""
    fmt = tr.cfg.checkpoint_format
    return fmt == "sharded" or (fmt == "auto" and dist_utils.is_sharded(tr.raw_model) and tr.dist.world_size > 1)


def data_position(tr: Trainer) -> dict[str, Any]:
    """The parts of the training state that a half-done step changes: sampler position and RNG."""
    return {"sampler": tr.sampler.state_dict(), "rng": ckpt_io.rng_state(tr.device)}


def save(tr: Trainer, state: dict[str, Any] | None = None) -> Path | None:
    """Write ``output_dir/checkpoint-{step}`` (rank 0, or each rank its shard; all take part); its path on rank 0."""
    tr.stale_steps.discard(tr.step)  # written again now: part of this run
    # Collective under FSDP (the optimizer state is gathered unless sharded): every rank computes it.
    contents = {
        "training_state": state or training_state(tr),
        "config": tr.cfg,
        "tokenizer": tr.tokenizer,
        "save_total_limit": tr.cfg.save_total_limit,
        "stale_steps": tr.stale_steps,
    }
    if writes_shards(tr):
        path = sharded.save_sharded(tr.output_dir, tr.step, tr.raw_model, tr.optimizer, **contents)
        return path if tr.is_main else None
    # FSDP: gathering the whole model is collective too; rank 0 writes.
    model_state = dist_utils.full_model_state(tr.raw_model)
    path = ckpt_io.save_checkpoint(tr.output_dir, tr.step, model_state=model_state, **contents) if tr.is_main else None
    dist_utils.barrier(tr.dist)
    return path


def resume(tr: Trainer, path: Path) -> None:
    """Load ``path`` into the trainer's model, optimizer, scaler, sampler, RNG and counters.

    Raises :class:`~minilm.checkpoint.CheckpointError` for a checkpoint that cannot continue
    this config (another model shape, tokenizer, seed or batch layout).
    """
    # A sharded checkpoint into a sharded model: each rank reads only its own pieces (below).
    direct = dist_utils.is_sharded(tr.raw_model) and ckpt_io.is_sharded_checkpoint(path)
    ck = ckpt_io.load_checkpoint(path, map_location="cpu", weights=not direct)
    changed = ckpt_io.check_resumable(ck, tr.cfg, tr.tokenizer.fingerprint)
    if changed:
        tr.log(f"note: resuming with fields changed since the checkpoint: {', '.join(changed)}")
    note = world_size_note(ck, tr.cfg)
    if note:
        tr.log(note)
    st = ck.training_state
    _load_model_and_optimizer(tr, ck, direct)
    if tr.scaler.is_enabled() and not st["scaler"]:
        # Not trained in fp16: a disabled scaler saves {}. A fresh scaler is how any fp16 run starts.
        tr.log("note: the checkpoint was not trained in fp16 (no scaler state); starting a fresh gradient scaler")
    else:
        tr.scaler.load_state_dict(st["scaler"])
    try:
        tr.sampler.load_state_dict(st["sampler"])
    except ValueError as e:  # another seed, or a batch size that cannot continue the data stream
        raise CheckpointError(f"{path}: {e}") from None
    ckpt_io.set_rng_state(st["rng"], tr.device)  # CUDA: onto this rank's own GPU
    tr.step = ck.step
    tr.tokens_seen = int(st["tokens_seen"])
    tr.last_checkpoint = path
    # Metrics past the resume step belong to the run being replaced: they move to replaced/.
    tr.history = runs.rewind(tr.output_dir, tr.step, write=tr.is_main, log=tr.log)
    # So do checkpoints past it: rotation (save_total_limit) deletes them first, before any of this run's.
    later = map(ckpt_io.checkpoint_step, ckpt_io.list_checkpoints(tr.output_dir))
    tr.stale_steps = {s for s in later if s > tr.step}
    tr.log(f"resumed from {path} at step {tr.step}")


def world_size_note(ck: ckpt_io.Checkpoint, cfg: Config) -> str | None:
    """What stays exact when ``cfg`` resumes ``ck`` at another world size (None: the same world size)."""
    old, new = ck.config, cfg
    if old.world_size == new.world_size:
        return None
    same_batch = old.batch_size * old.world_size == new.batch_size * new.world_size
    text = (
        f"note: resuming a {old.world_size}-process run on {new.world_size} process(es). Exact: weights, AdamW "
        "state, step, learning-rate schedule, tokens seen and the data stream (the sampler continues at the next "
        "unseen sequence). "
    )
    if same_batch:
        text += (
            f"The global batch is unchanged ({new.batch_size * new.world_size} sequences), so each step sees the "
            "same sequences as before; losses agree up to the order of the gradient sums (fp32: ~1e-7 relative)."
        )
    else:
        text += (
            f"The global batch changed ({old.batch_size * old.world_size} -> {new.batch_size * new.world_size} "
            "sequences per micro-batch): the steps group the sequences differently, so the curve differs."
        )
    if new.dropout > 0:
        text += " Dropout masks are drawn per process batch, so they differ from the uninterrupted run's."
    return text


def _load_model_and_optimizer(tr: Trainer, ck: ckpt_io.Checkpoint, direct: bool) -> None:
    """Weights and AdamW state; ``direct``: a sharded checkpoint read shard by shard into the FSDP model."""
    configured = [{k: g[k] for k in ("weight_decay", "betas")} for g in tr.optimizer.param_groups]
    if direct:
        sharded.load_into(ck, tr.raw_model, tr.optimizer)
        _restore_groups(tr, configured)
        return
    dist_utils.load_full_model_state(tr.raw_model, ck.model_state)
    tr.raw_model.to(tr.device)
    _load_optimizer(tr, ck.training_state["optimizer"])


def _restore_groups(tr: Trainer, configured: list[dict]) -> None:
    for group, values in zip(tr.optimizer.param_groups, configured, strict=True):
        group.update(values)


def _load_optimizer(tr: Trainer, state: dict) -> None:
    """AdamW's moments and step counts; the config's hyperparameters win over the saved ones.

    ``load_state_dict`` also restores each group's saved ``weight_decay`` and ``betas``; a resume
    with a new ``--weight_decay`` / ``--beta1`` / ``--beta2`` should use the new values (the
    learning rate is set every step anyway), so the groups keep what the config built.
    """
    configured = [{k: g[k] for k in ("weight_decay", "betas")} for g in tr.optimizer.param_groups]
    dist_utils.load_full_optimizer_state(tr.raw_model, tr.optimizer, state)
    _restore_groups(tr, configured)
