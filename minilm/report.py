"""What a training run prints: the header before the first step and the summary after the last."""

from __future__ import annotations

from typing import TYPE_CHECKING

from minilm.counting import parameter_table

if TYPE_CHECKING:
    from minilm.trainer import Trainer, TrainResult


def run_header(tr: Trainer) -> str:
    """Parameters, device and precision, data, tokens and FLOPs per step, and the loss to beat."""
    cfg = tr.cfg
    world = f", {tr.dist.world_size} processes" if tr.dist.enabled else ""
    device = (
        f"device {tr.device}{world}, {tr.precision_name}"
        + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
        + (f", {tr.compile_reason}" if tr.compile else "")
    )
    data = (
        f"data: {cfg.dataset}, {tr.tokenizer.kind} tokenizer with {tr.tokenizer.vocab_size} ids, "
        f"{len(tr.train_tokens):,} train / {len(tr.val_tokens):,} validation tokens"
    )
    step = (
        f"{cfg.tokens_per_step:,} tokens per step (batch {cfg.batch_size} x accumulation "
        f"{cfg.grad_accumulation_steps} x {tr.dist.world_size} processes x {cfg.max_seq_len} tokens), "
        f"{tr.flops_per_token:,} model FLOPs per token"
        + (f"; MFU against the {tr.peak_source}, {tr.peak_flops / 1e12:g} TFLOP/s" if tr.peak_flops else "")
    )
    baseline = f"unigram baseline (validation): {tr.unigram_loss:.4f} nats/token: the loss to get below"
    return "\n".join([parameter_table(cfg), device, data, step, baseline])


def run_summary(tr: Trainer, r: TrainResult) -> str:
    """Why the run stopped, the last validation loss, speed (warm-up apart), checkpoint and sample."""
    lines = [f"{r.status}: {r.message}"]
    if r.val_loss is not None:
        lines.append(
            f"validation loss {r.val_loss:.4f} at step {r.val_step} (perplexity {r.val_perplexity:.2f}) "
            f"vs unigram baseline {r.unigram_loss:.4f}"
        )
    speed = f"{r.tokens_per_s:,.0f} training tokens/s = {r.tokens_per_s * tr.flops_per_token / 1e12:.3g} TFLOP/s"
    if r.mfu is not None:
        n = f"{tr.dist.world_size} x " if tr.dist.world_size > 1 else ""
        speed += f", MFU {r.mfu:.1%} (of {n}the {tr.peak_source})"
    lines.append(f"{speed}; {r.wall_time_s:.1f} s in train()")
    if r.warmup_s and r.step > 1:
        what = "compiling (torch.compile) and warm-up" if tr.compile else "warm-up"
        lines.append(f"first step: {r.warmup_s:.1f} s of {what}, not counted in tokens/s")
    if r.checkpoint:
        lines.append(f"checkpoint: {r.checkpoint}")
    if r.sample is not None:
        lines.append("sample:\n" + r.sample)
    return "\n".join(lines)
