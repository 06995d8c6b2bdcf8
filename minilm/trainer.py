"""The training loop: AdamW, warmup + cosine schedule, mixed precision, accumulation, checkpoints, DDP.

From a notebook::

    >>> from minilm import load_config
    >>> from minilm.trainer import Trainer
    >>> cfg = load_config("configs/training/tiny_model.json", overrides={"max_steps": 200})
    >>> trainer = Trainer(cfg)
    >>> trainer.add_callback("on_eval", lambda tr, rec: print(rec["step"], rec["val_loss"]))
    >>> result = trainer.train()          # TrainResult: final losses, history, sample, checkpoint
    >>> result.val_loss, result.unigram_loss
    >>> Trainer(cfg, resume_from_checkpoint="outputs/tiny/checkpoint-200").train()

From a shell (see :mod:`minilm.cli`)::

    python train.py --config configs/training/tiny_model.json
    python train.py --config configs/training/tiny_model.json --resume_from_checkpoint outputs/tiny/checkpoint-400
    torchrun --nproc_per_node=2 train.py --config configs/training/tiny_model.json --world_size 2

One optimizer step, in order:

1. set the learning rate for this step (:func:`lr_at`: linear warmup, then cosine decay);
2. for each of ``grad_accumulation_steps`` micro-batches: forward under the precision
   context, backward of ``loss / k`` (so the summed gradient is the mean over the k
   micro-batches); under DDP the gradient all-reduce runs only on the last one;
3. stop if the loss is not finite (before any weight changes);
4. unscale (fp16 only), clip the global gradient norm, ``optimizer.step()``, zero grads;
5. log, evaluate every ``eval_steps``, checkpoint every ``save_steps``.

Precision is one switch (nanoGPT's habit): ``nullcontext()`` for fp32, ``torch.autocast``
for bf16/fp16, and a ``GradScaler`` that is a no-op unless fp16. The loop has no other
precision branches.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minilm import checkpoint as ckpt_io
from minilm import distributed as dist_utils
from minilm.checkpoint import CheckpointError
from minilm.compile_policy import compile_decision
from minilm.config import Config
from minilm.counting import parameter_table
from minilm.data import BatchSampler, eval_batches, prepare_data, unigram_baseline
from minilm.flops import flops_per_token
from minilm.hardware import measure_matmul_flops, peak_flops
from minilm.model import GPT
from minilm.precision import autocast_context, autocast_dtype, describe_precision

NOT_CONVERGING_ADVICE = (
    "The design's advice when training does not converge: halve the learning rate (--learning_rate), "
    "use more warmup steps (--warmup_steps), a larger batch (--batch_size or --grad_accumulation_steps), "
    "and check the data."
)

# Fields that fix the network's shape or its token ids: a checkpoint only fits a config that agrees.
SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "max_seq_len",
    "bias",
    "tie_embeddings",
    "activation",
    "tokenizer",
    "dataset",
    "val_fraction",
)

EVENTS = ("on_train_start", "on_step_end", "on_eval", "on_checkpoint", "on_train_end")
Callback = Callable[["Trainer", dict], None]


# ---------------------------------------------------------------------------------------
# Schedule and optimizer
# ---------------------------------------------------------------------------------------
def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup climbs linearly to ``learning_rate`` over ``warmup_steps`` steps (step
    ``warmup_steps - 1`` uses the full rate). Then the rate follows half a cosine from
    ``learning_rate`` down to ``learning_rate * min_lr_ratio`` at ``max_steps``.
    """
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device, verbose: bool = True) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (dim >= 2), none on biases and norms.

    Decaying a matrix pulls its weights toward zero, a regulariser; decaying a bias or a
    LayerNorm gain would only shift or shrink activations. The fused kernel (one launch
    for all parameters, on CUDA and CPU) is used where this torch has it.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # minGPT's check: every trainable parameter is in exactly one group.
    ids_decay, ids_no_decay = {id(p) for p in decay}, {id(p) for p in no_decay}
    assert not ids_decay & ids_no_decay, "a parameter is in both weight-decay groups"
    assert ids_decay | ids_no_decay == {id(p) for p in params}, "a parameter is in no weight-decay group"
    if verbose:
        print(
            f"AdamW: weight decay {cfg.weight_decay} on {len(decay)} matrices "
            f"({sum(p.numel() for p in decay):,} parameters); none on {len(no_decay)} biases and norms "
            f"({sum(p.numel() for p in no_decay):,} parameters)"
        )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def precision(
    cfg: Config, device: torch.device, cpu_bf16: bool | None = None
) -> tuple[AbstractContextManager, torch.amp.GradScaler, str]:
    """The precision switch: (context to run forward passes in, gradient scaler, description).

    fp32: ``nullcontext()``; bf16 / fp16: ``torch.autocast`` (:mod:`minilm.precision` picks the
    dtype from the config and the hardware). The scaler multiplies the loss before backward
    so small fp16 gradients do not underflow, and skips steps whose gradients overflowed; it
    is a pass-through for anything but fp16.
    """
    dtype = autocast_dtype(cfg, device, cpu_bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    name = describe_precision(cfg, device, cpu_bf16) + (" + gradient scaler" if scaler.is_enabled() else "")
    return autocast_context(device, dtype), scaler, name


# CUDA device names of the cards in minilm.hardware.ACCELERATORS, without vendor words ('NVIDIA',
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
    """The :mod:`minilm.hardware` entry for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100 SXM'.

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

    A GPU in :data:`minilm.hardware.ACCELERATORS` uses its datasheet peak; any other GPU is
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


@torch.no_grad()
def generate_text(
    model: GPT,
    tokenizer: Any,
    prompt: str | list[int],
    max_new_tokens: int = 300,
    temperature: float = 0.8,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> list[str]:
    """Continue ``prompt`` (text or token ids) ``num_samples`` times; returns the decoded texts.

    The model may have more output ids than the tokenizer has tokens (``vocab_size`` is
    rounded up, or BPE ran out of merges): those ids never occur in the data, so a
    forward hook masks their logits to -inf and ``model.generate`` can never pick one.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token to continue")
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    n_real = tokenizer.vocab_size

    def mask_unused(module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, torch.arange(n_real, logits.size(-1), device=logits.device), float("-inf"))

    handle = model.lm_head.register_forward_hook(mask_unused) if n_real < model.cfg.vocab_size else None
    try:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        if handle is not None:
            handle.remove()
    return [tokenizer.decode(row) for row in out.tolist()]


# ---------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------
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
    tokens_per_s: float  # training tokens per second of step time (all processes together)
    mfu: float | None  # model FLOPs utilisation (0-1) against the GPU's peak; None on a CPU
    wall_time_s: float  # seconds from the start of train() to the end, evaluation and saving included
    checkpoint: Path | None  # the last checkpoint saved (after a non-finite loss: the last good one)
    sample: str | None  # text generated at the end
    message: str = ""  # why the run stopped, in words
    history: list[dict] = field(default_factory=list)  # every metrics.jsonl record of the run

    @property
    def losses(self) -> list[float]:
        """Training loss of every step, in order."""
        return [r["loss"] for r in self.history if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------
class Trainer:
    """Trains ``GPT(cfg)`` on ``cfg.dataset``; see the module docstring for the loop.

    Args:
        cfg: the run's config (model, schedule, system switches).
        resume_from_checkpoint: a ``checkpoint-N`` folder to continue from exactly.
        callbacks: ``{event: fn}`` or ``[(event, fn), ...]``; events are ``on_train_start``,
            ``on_step_end``, ``on_eval``, ``on_checkpoint``, ``on_train_end``. Each ``fn(trainer,
            record)`` gets the event's metrics record (a dict). Runs on rank 0 only.
        progress: show a tqdm bar (a widget in notebooks).
        verbose: print the setup, evaluations and summary (rank 0 only).
        cache_dir: where tokenized data is cached (default ``~/.cache/minilm``).
        handle_signals: on SIGINT/SIGTERM finish the step, save a checkpoint and stop.
        sample_tokens: tokens to generate at the end (0: no sample).
        cpu_bf16: on a CPU with ``bf16``/``fp16`` set: None runs bf16 autocast only where the CPU
            multiplies bf16 natively (else fp32, which is faster there); True runs it on any CPU
            (emulated where not native: several times slower); False keeps fp32. See :mod:`minilm.precision`.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        resume_from_checkpoint: str | Path | None = None,
        callbacks: Mapping[str, Callback] | Iterable[tuple[str, Callback]] | None = None,
        progress: bool = True,
        verbose: bool = True,
        cache_dir: str | Path | None = None,
        handle_signals: bool = True,
        sample_tokens: int = 300,
        cpu_bf16: bool | None = None,
    ):
        self.cfg = cfg
        self.device = dist_utils.local_device(cfg.device)
        self.dist = dist_utils.setup(cfg, self.device)
        self.is_main = self.dist.is_main
        self.verbose = verbose and self.is_main
        self.progress = progress and self.is_main
        self.handle_signals = handle_signals
        self.sample_tokens = sample_tokens
        self.output_dir = Path(cfg.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.callbacks: dict[str, list[Callback]] = {e: [] for e in EVENTS}
        items = callbacks.items() if isinstance(callbacks, Mapping) else (callbacks or [])
        for event, fn in items:
            self.add_callback(event, fn)

        # Data: rank 0 tokenizes and caches first; the others then read the cache.
        if not self.is_main:
            dist_utils.barrier(self.dist)
        self.tokenizer, self.train_tokens, self.val_tokens = prepare_data(cfg, cache_dir)
        if self.is_main:
            dist_utils.barrier(self.dist)
        self.sampler = BatchSampler(
            self.train_tokens,
            cfg.batch_size,
            cfg.max_seq_len,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
        )
        self.val_batches = eval_batches(
            self.val_tokens, cfg.batch_size, cfg.max_seq_len, cfg.eval_batches, self.dist.rank, self.dist.world_size
        )

        self.unigram_loss = unigram_baseline(self.train_tokens, self.val_tokens, self.tokenizer.vocab_size)

        # Model, optimizer, precision. Every rank seeds alike, so all start from the same weights.
        # (The ranks then also draw the same dropout masks, on different data: one RNG state,
        # rank 0's, is then the state of every rank, which keeps a DDP resume exact.)
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(cfg).to(self.device)  # the plain module: its state dict is what we save
        self.autocast, self.scaler, self.precision_name = precision(cfg, self.device, cpu_bf16)
        self.flops_per_token = flops_per_token(cfg)  # model FLOPs (forward + backward) per trained token
        self.peak_flops, self.peak_source = device_peak_flops(self.device, autocast_dtype(cfg, self.device, cpu_bf16))
        # On a CPU a long run compiles even when the config does not ask (minilm.compile_policy).
        self.compile, self.compile_reason = compile_decision(cfg, self.device, self.flops_per_token)
        self._print_header()
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device, verbose=self.verbose)
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.tokens_seen = 0
        self._stop_reason: str | None = None
        self._in_update = False
        self._saved_step: int | None = None
        self._stale_steps: set[int] = set()  # after a resume: checkpoints of the replaced run (see _resume)
        self._boundary: dict[str, Any] = {}

        if resume_from_checkpoint is not None:
            self._resume(Path(resume_from_checkpoint))

        self.model: nn.Module = self.raw_model
        if self.compile:
            self.model = torch.compile(self.model)  # state dicts still come from raw_model: no _orig_mod.
        self.model = dist_utils.wrap(self.model, self.dist, self.device)

    # -- callbacks and control ---------------------------------------------------------
    def add_callback(self, event: str, fn: Callback) -> None:
        """Call ``fn(trainer, record)`` on ``event`` (one of :data:`EVENTS`)."""
        if event not in self.callbacks:
            raise ValueError(f"unknown event {event!r}; choose from {', '.join(EVENTS)}")
        self.callbacks[event].append(fn)

    def _fire(self, event: str, record: dict) -> None:
        if self.is_main:
            for fn in self.callbacks[event]:
                fn(self, record)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Finish the current step, save a checkpoint and return from :meth:`train`."""
        self._stop_reason = reason

    def close(self) -> None:
        """Stop data workers and leave the process group (the CLI calls this; notebooks rarely need to)."""
        self.sampler.close()
        dist_utils.cleanup(self.dist)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of a throughput (all processes): model FLOP/s over the devices' peak."""
        if not self.peak_flops:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop (a signal may reach only some): all ranks must agree."""
        flag = torch.tensor(float(self._stop_reason is not None), device=self.device)
        return float(dist_utils.all_reduce_sum(flag, self.dist)) > 0

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(msg)

    # -- the pieces of one step ---------------------------------------------------------
    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accumulation_steps`` micro-batches for the next step, on the device."""
        non_blocking = self.device.type == "cuda"
        return [
            tuple(t.to(self.device, non_blocking=non_blocking) for t in self.sampler.next_batch())
            for _ in range(self.cfg.grad_accumulation_steps)
        ]

    def compute_gradients(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over the micro-batches; gradients accumulate in ``.grad``.

        Each loss is divided by the number of micro-batches, so the gradient is that of the
        mean loss over all of them: k micro-batches of B sequences give the gradient of one
        batch of k·B. Under DDP only the last backward all-reduces (``no_sync`` on the others),
        leaving the gradient averaged over ranks too. Returns this rank's mean loss (detached).
        """
        k = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == k - 1
            sync = nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.autocast:
                    # The loss alone (minilm.loss): the (B, T, V) logits are never built.
                    loss = self.model(x, y, return_logits=False)[1]
                self.scaler.scale(loss / k).backward()
            total += loss.detach().float()
        return total / k

    def clip_gradients(self) -> float:
        """Unscale (fp16 only) and clip the global gradient norm; returns the norm before clipping."""
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16: clipping must see the true gradients
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm))

    def optimizer_step(self) -> None:
        """AdamW step (fp16: skipped by the scaler when gradients overflowed), then zero the gradients."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss over the fixed ``eval_batches`` (mean over all ranks) and its perplexity."""
        was_training = self.raw_model.training
        self.raw_model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for x, y in self.val_batches:
            with self.autocast:
                _, loss = self.raw_model(x.to(self.device), y.to(self.device), return_logits=False)
            total += loss.double()
        self.raw_model.train(was_training)
        dist_utils.all_reduce_sum(total, self.dist)
        val_loss = float(total) / (len(self.val_batches) * self.dist.world_size)
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}

    @torch.no_grad()
    def sample(
        self, prompt: str | None = None, max_new_tokens: int = 300, temperature: float = 0.8, top_k: int | None = 40
    ) -> str:
        """Generate text from ``prompt`` (default: a newline) with a generator seeded by ``cfg.seed``.

        Uses its own random generator, so sampling never disturbs the training RNG stream.
        """
        if prompt is None:
            try:
                prompt = self.tokenizer.encode("\n")
            except ValueError:  # a character vocabulary without newlines: start from validation's first token
                prompt = [int(self.val_tokens[0])]
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        with self.autocast:
            return generate_text(self.raw_model, self.tokenizer, prompt, max_new_tokens, temperature, top_k, gen)[0]

    # -- checkpoints --------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """Optimizer, scaler, RNG, sampler position and counters: what a checkpoint needs besides weights."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt_io.rng_state(self.device),
            "sampler": self.sampler.state_dict(),
            "tokens_seen": self.tokens_seen,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
        }

    def _data_position(self) -> dict[str, Any]:
        """The parts of the training state that a half-done step changes: sampler position and RNG."""
        return {"sampler": self.sampler.state_dict(), "rng": ckpt_io.rng_state(self.device)}

    def save_checkpoint(self, state: dict[str, Any] | None = None) -> Path | None:
        """Write ``output_dir/checkpoint-{step}`` (rank 0; other ranks wait) and return its path."""
        path = None
        self._stale_steps.discard(self.step)  # written again now: part of this run
        if self.is_main:
            path = ckpt_io.save_checkpoint(
                self.output_dir,
                self.step,
                model_state=self.raw_model.state_dict(),
                training_state=state or self.training_state(),
                config=self.cfg,
                tokenizer=self.tokenizer,
                save_total_limit=self.cfg.save_total_limit,
                stale_steps=self._stale_steps,
            )
            self.last_checkpoint = path
            self._saved_step = self.step
            self._fire("on_checkpoint", {"kind": "checkpoint", "step": self.step, "path": str(path)})
        dist_utils.barrier(self.dist)
        return path

    def _resume(self, path: Path) -> None:
        ck = ckpt_io.load_checkpoint(path, map_location="cpu")
        mismatched = [f for f in SHAPE_FIELDS if getattr(ck.config, f) != getattr(self.cfg, f)]
        if mismatched:
            details = ", ".join(
                f"{f}: checkpoint {getattr(ck.config, f)!r} vs config {getattr(self.cfg, f)!r}" for f in mismatched
            )
            raise CheckpointError(f"{path}: does not fit this config ({details})")
        changed = [f for f in self.cfg.to_dict() if getattr(ck.config, f) != getattr(self.cfg, f)]
        if changed:
            self.log(f"note: resuming with fields changed since the checkpoint: {', '.join(changed)}")
        st = ck.training_state
        if st.get("tokenizer_fingerprint") != self.tokenizer.fingerprint:
            raise CheckpointError(f"{path}: its tokenizer differs from the one built for dataset '{self.cfg.dataset}'")
        self.raw_model.load_state_dict(ck.model_state)
        self.raw_model.to(self.device)
        # load_state_dict also restores each group's saved hyperparameters; the config's win, so a
        # resume with a new --weight_decay / --beta1 / --beta2 uses them (the learning rate is set every
        # step). The groups were built from the config just now: keep those values, load the rest.
        configured = [{k: g[k] for k in ("weight_decay", "betas")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(st["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(values)
        if self.scaler.is_enabled() and not st["scaler"]:
            # Not trained in fp16: a disabled scaler saves {}. A fresh scaler is how any fp16 run starts.
            self.log("note: the checkpoint was not trained in fp16 (no scaler state); starting a fresh gradient scaler")
        else:
            self.scaler.load_state_dict(st["scaler"])
        try:
            self.sampler.load_state_dict(st["sampler"])
        except ValueError as e:  # another seed, or a batch size that cannot continue the data stream
            raise CheckpointError(f"{path}: {e}") from None
        ckpt_io.set_rng_state(st["rng"], self.device)  # CUDA: onto this rank's own GPU
        self.step = ck.step
        self.tokens_seen = int(st["tokens_seen"])
        self.last_checkpoint = path
        self.history = self._truncate_metrics(self.step)
        # Checkpoints past the resume step belong to the run being replaced, like the metrics above:
        # rotation (save_total_limit) deletes them first, before any of this run's.
        self._stale_steps = {
            s for s in map(ckpt_io.checkpoint_step, ckpt_io.list_checkpoints(self.output_dir)) if s > self.step
        }
        self.log(f"resumed from {path} at step {self.step}")

    def _truncate_metrics(self, step: int) -> list[dict]:
        """Keep metrics.jsonl records up to ``step`` (later ones belong to the run being replaced)."""
        if not self.metrics_path.exists():
            return []
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= step:
                kept.append(rec)
        if self.is_main:
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.metrics_path)
        return kept

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run from ``self.step`` to ``cfg.max_steps``; returns a :class:`TrainResult`.

        Stops early, saving a checkpoint first, on SIGINT/SIGTERM, KeyboardInterrupt or
        :meth:`request_stop`. A non-finite loss or gradient stops the run before the weights
        change, without saving, so the last checkpoint on disk is the last good one.
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"training steps {self.step} -> {cfg.max_steps}; metrics in {self.metrics_path}")
        self._fire("on_train_start", {"kind": "start", "step": self.step})
        restore = self._install_signal_handlers()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        status, message = "completed", f"reached max_steps={cfg.max_steps}"
        train_time, train_tokens = 0.0, 0
        loss_value: float | None = None
        last_eval = next((r for r in reversed(self.history) if r["kind"] == "eval"), None)  # after a resume
        self.raw_model.train()
        self._boundary = self._data_position()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.compute_gradients(self.next_micro_batches())
                loss_value = float(dist_utils.all_reduce_sum(loss, self.dist)) / self.dist.world_size
                grad_norm = self.clip_gradients()  # the same on every rank: gradients are all-reduced
                # Stop before the weights change. (fp16: the scaler itself skips overflowed gradients.)
                bad = "loss" if not math.isfinite(loss_value) else None
                if bad is None and not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                    bad = "gradient norm"
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    status = "non_finite"
                    message = self._non_finite_message(bad, loss_value if bad == "loss" else grad_norm)
                    break
                tokens = cfg.tokens_per_step
                self._in_update = True  # a KeyboardInterrupt in here cannot be saved consistently
                self.optimizer_step()
                # Everything a checkpoint of this step holds changes in here, so that an interrupt
                # just after it saves step N with step N's counters, not step N-1's.
                self.step += 1
                self.tokens_seen += tokens
                self._boundary = self._data_position()
                self._in_update = False
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # honest timing
                dt = time.perf_counter() - t0
                train_time, train_tokens = train_time + dt, train_tokens + tokens
                rec = {
                    "kind": "train",
                    "step": self.step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": self.tokens_seen,
                    "tokens_per_s": tokens / dt,
                    **({"mfu": self.mfu(tokens / dt)} if self.peak_flops else {}),
                    "time_s": time.perf_counter() - t_start,
                }
                self._record(rec)
                self._fire("on_step_end", rec)
                postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens / dt:,.0f}"}
                if self.peak_flops:
                    postfix["mfu"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)

                if self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                    last_eval = self._eval_and_record()
                if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self._stop_requested():
                    status = "interrupted"
                    message = f"{self._stop_reason or 'another process was interrupted'} at step {self.step}"
                    if self._saved_step != self.step:
                        self.save_checkpoint()
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, or an interrupt that no handler caught (e.g. training in a thread).
            status = "interrupted"
            if self._in_update:
                message = f"interrupted during the weight update of step {self.step + 1}: nothing saved"
            else:
                # Drop the half-done step: save the data position and RNG from the last step boundary.
                self.optimizer.zero_grad(set_to_none=True)
                self.save_checkpoint({**self.training_state(), **self._boundary})
                message = f"KeyboardInterrupt at step {self.step}"
        finally:
            bar.close()
            restore()

        tokens_per_s = train_tokens / train_time if train_time > 0 else 0.0
        sample = None
        if status == "completed" and self.is_main and self.sample_tokens > 0:
            sample = self.sample(max_new_tokens=self.sample_tokens)
        # The other ranks wait while rank 0 samples, so that none tears down the process group
        # (Trainer.close) while another still works: under load that raced gloo's shutdown.
        dist_utils.barrier(self.dist)
        result = TrainResult(
            status=status,
            step=self.step,
            train_loss=loss_value,
            val_loss=last_eval["val_loss"] if last_eval else None,
            val_perplexity=last_eval["val_perplexity"] if last_eval else None,
            val_step=last_eval["step"] if last_eval else None,
            unigram_loss=self.unigram_loss,
            tokens_per_s=tokens_per_s,
            mfu=self.mfu(tokens_per_s),
            wall_time_s=time.perf_counter() - t_start,
            checkpoint=self.last_checkpoint,
            sample=sample,
            message=message,
            history=list(self.history),
        )
        self._print_summary(result)
        self._fire("on_train_end", {"kind": "end", "step": self.step, "status": status, "result": result})
        return result

    def _eval_and_record(self) -> dict[str, Any]:
        ev = self.evaluate()
        rec = {"kind": "eval", "step": self.step, **ev}
        self._record(rec)
        self.log(
            f"step {self.step:>6}: val loss {ev['val_loss']:.4f}, perplexity {ev['val_perplexity']:.2f} "
            f"(unigram baseline {self.unigram_loss:.4f})"
        )
        self._fire("on_eval", rec)
        return rec

    def _non_finite_message(self, what: str, value: float) -> str:
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint saved"
        return f"non-finite {what} ({value}) at step {self.step}: training stopped; {kept}. {NOT_CONVERGING_ADVICE}"

    def _install_signal_handlers(self) -> Callable[[], None]:
        """On SIGINT/SIGTERM, ask the loop to save and stop; a second SIGINT interrupts at once."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None

        pid = os.getpid()

        def handler(signum, frame):
            if os.getpid() != pid:
                return  # a forked data-loader worker inherited this handler: it keeps serving the main process
            name = signal.Signals(signum).name
            if self._stop_reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_reason = f"received {name}"
            if self.is_main:
                tqdm.write(f"{name}: saving a checkpoint after this step, then stopping (Ctrl-C again quits now)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def _print_header(self) -> None:
        if not self.verbose:
            return
        cfg = self.cfg
        print(parameter_table(cfg))
        world = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        print(
            f"device {self.device}{world}, {self.precision_name}"
            + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
            + (f", {self.compile_reason}" if self.compile else "")
        )
        print(
            f"data: {cfg.dataset}, {self.tokenizer.kind} tokenizer with {self.tokenizer.vocab_size} ids, "
            f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} validation tokens"
        )
        print(
            f"{cfg.tokens_per_step:,} tokens per step (batch {cfg.batch_size} x accumulation "
            f"{cfg.grad_accumulation_steps} x {self.dist.world_size} processes x {cfg.max_seq_len} tokens), "
            f"{self.flops_per_token:,} model FLOPs per token"
            + (f"; MFU against the {self.peak_source}, {self.peak_flops / 1e12:g} TFLOP/s" if self.peak_flops else "")
        )
        print(f"unigram baseline (validation): {self.unigram_loss:.4f} nats/token: the loss to get below")

    def _print_summary(self, r: TrainResult) -> None:
        if not self.verbose:
            return
        print(f"{r.status}: {r.message}")
        if r.val_loss is not None:
            print(
                f"validation loss {r.val_loss:.4f} at step {r.val_step} (perplexity {r.val_perplexity:.2f}) "
                f"vs unigram baseline {r.unigram_loss:.4f}"
            )
        speed = f"{r.tokens_per_s:,.0f} training tokens/s = {r.tokens_per_s * self.flops_per_token / 1e12:.3g} TFLOP/s"
        if r.mfu is not None:
            n = f"{self.dist.world_size} x " if self.dist.world_size > 1 else ""
            speed += f", MFU {r.mfu:.1%} (of {n}the {self.peak_source})"
        print(f"{speed}; {r.wall_time_s:.1f} s in train()")
        if r.checkpoint:
            print(f"checkpoint: {r.checkpoint}")
        if r.sample is not None:
            print("sample:\n" + r.sample)


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """``Trainer(cfg, **kwargs).train()``."""
    return Trainer(cfg, **kwargs).train()
