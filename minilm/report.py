"""What a training run reports: its result, its speed (warm-up apart), the header and the summary it prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from minilm.counting import parameter_table

if TYPE_CHECKING:
    from minilm.trainer import Trainer


class NoBar:
    """What a run without a progress bar updates instead of a disabled tqdm.

    A tqdm bar, even a disabled one, takes tqdm's lock, which is shared with forked processes: a
    process killed while holding it would block every other that writes through tqdm.
    """

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


ProgressBar = tqdm | NoBar


def progress_bar(enabled: bool, total: int, initial: int = 0) -> ProgressBar:
    """A bar of optimizer steps: tqdm's (a widget in notebooks) when ``enabled``, else one touching no tqdm state."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else NoBar()


def print_line(msg: str, progress: bool) -> None:
    """Print a line; through tqdm (so that it lands above a live bar) only when bars are on."""
    if progress:
        tqdm.write(msg)
    else:
        print(msg, flush=True)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns. Losses are mean cross-entropy in nats per token."""

    status: str  # 'completed', 'interrupted' (signal or request_stop) or 'non_finite'
    step: int  # optimizer steps taken when the run stopped
    train_loss: float | None  # last step's training loss
    val_loss: float | None  # last validation loss
    val_perplexity: float | None  # exp(val_loss)
    val_step: int | None  # the step at which val_loss was measured
    unigram_loss: float | None  # validation loss of "predict by token frequency": the bar to beat
    tokens_per_s: float  # training tokens per second of step time (all processes), warm-up step excluded
    mfu: float | None  # model FLOPs utilisation (0-1) against the GPU's peak; None on a CPU
    wall_time_s: float  # seconds from the start of train() to the end, evaluation and saving included
    checkpoint: Path | None  # the last checkpoint saved (after a non-finite loss: the last good one)
    sample: str | None  # text generated at the end
    message: str = ""  # why the run stopped, in words
    history: list[dict] = field(default_factory=list)  # every metrics.jsonl record of the run
    warmup_s: float = 0.0  # seconds of the first step, kept out of tokens_per_s (with compile: compiling)

    @property
    def losses(self) -> list[float]:
        """Training loss of every step, in order."""
        return [r["loss"] for r in self.history if r["kind"] == "train"]


@dataclass
class StepClock:
    """Step time and tokens, with the first step of a run kept apart: it pays for warm-up
    (allocations, kernel selection and, with ``compile``, compilation), not for training."""

    start: float  # perf_counter() when train() began
    warmup_s: float = 0.0
    steps: int = 0
    time_s: float = 0.0  # steps after the first
    tokens: int = 0
    first_tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        if self.steps == 0:
            self.warmup_s, self.first_tokens = seconds, tokens
        else:
            self.time_s, self.tokens = self.time_s + seconds, self.tokens + tokens
        self.steps += 1

    @property
    def tokens_per_s(self) -> float:
        """Steady-state throughput; a run of one step has only its warm-up step to go by."""
        if self.time_s > 0:
            return self.tokens / self.time_s
        return self.first_tokens / self.warmup_s if self.warmup_s > 0 else 0.0


def train_result(tr: Trainer, status: str, message: str, sample: str | None) -> TrainResult:
    """The :class:`TrainResult` of a run that stopped now, for ``status`` and ``message``."""
    last_eval, tokens_per_s = tr.last_eval or {}, tr.clock.tokens_per_s
    return TrainResult(
        status=status,
        step=tr.step,
        train_loss=tr.last_loss,
        val_loss=last_eval.get("val_loss"),
        val_perplexity=last_eval.get("val_perplexity"),
        val_step=last_eval.get("step"),
        unigram_loss=tr.unigram_loss,
        tokens_per_s=tokens_per_s,
        mfu=tr.mfu(tokens_per_s),
        wall_time_s=time.perf_counter() - tr.clock.start,
        checkpoint=tr.last_checkpoint,
        sample=sample,
        message=message,
        history=list(tr.history),
        warmup_s=tr.clock.warmup_s,
    )


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
