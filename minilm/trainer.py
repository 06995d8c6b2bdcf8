"""The training loop: a :class:`Trainer` runs named steps (:mod:`minilm.step`) from a config to a checkpoint.

    >>> from minilm import Trainer, load_config
    >>> result = Trainer(load_config("tiny", overrides={"max_steps": 200})).train()

The command line, resume, accumulation, precision and ``torchrun``: :mod:`minilm.cli`, docs/training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilm import checkpoint as ckpt_io
from minilm import distributed as dist_utils
from minilm import report, resume, runs
from minilm import step as one_step
from minilm.compile_policy import compile_decision, compile_model
from minilm.config import Config
from minilm.data import BatchSampler, eval_batches, prepare_data, unigram_baseline
from minilm.flops import flops_per_token
from minilm.flops import mfu as model_flops_utilisation
from minilm.generation import generate_text  # re-exported: minilm.trainer.generate_text still works
from minilm.hardware import device_peak_flops
from minilm.interrupts import stop_on_signals
from minilm.model import GPT
from minilm.optim import default_impl, lr_at, make_optimizer
from minilm.precision import autocast_dtype, mixed_precision
from minilm.report import StepClock, TrainResult, run_header, run_summary, train_result

NOT_CONVERGING_ADVICE = (
    "The design's advice when training does not converge: halve the learning rate (--learning_rate), "
    "use more warmup steps (--warmup_steps), a larger batch (--batch_size or --grad_accumulation_steps), "
    "and check the data."
)

EVENTS = ("on_train_start", "on_step_end", "on_eval", "on_checkpoint", "on_train_end")
Callback = Callable[["Trainer", dict], None]


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
        overwrite_output_dir: start a fresh run even where ``output_dir`` holds another run's
            checkpoints or metrics (they move to ``output_dir/replaced/``); see :mod:`minilm.runs`.
        skip_memory_check: start even when a step's estimated memory exceeds what is free.
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
        overwrite_output_dir: bool = False,
        skip_memory_check: bool = False,
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
        # Before anything is allocated or written: memory check, run lock, one run per folder (minilm.runs).
        self._run_lock = runs.start_run(
            cfg,
            self.device,
            resuming=resume_from_checkpoint is not None,
            is_main=self.is_main,
            overwrite_output_dir=overwrite_output_dir,
            skip_memory_check=skip_memory_check,
            log=self.log,
        )
        self.callbacks: dict[str, list[Callback]] = {e: [] for e in EVENTS}
        for event, fn in callbacks.items() if isinstance(callbacks, Mapping) else (callbacks or []):
            self.add_callback(event, fn)

        self._setup_data(cache_dir)
        self._setup_model(cpu_bf16)
        if self.verbose:
            print(run_header(self))
        self.optimizer = make_optimizer(self.raw_model, cfg, impl=default_impl(self.device), verbose=self.verbose)
        self._init_counters()

        if resume_from_checkpoint is not None:
            with ckpt_io.resume_errors(resume_from_checkpoint):
                resume.resume(self, Path(resume_from_checkpoint))

        self.model: nn.Module = self.raw_model
        if self.compile:
            self.model = compile_model(self.model, self.device)  # state dicts come from raw_model: no _orig_mod.
        self.model = dist_utils.wrap(self.model, self.dist, self.device)

    def _init_counters(self) -> None:
        """Where the run stands; a resume overwrites these (:func:`minilm.resume.resume`)."""
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0
        self.history: list[dict] = []  # metrics records, as in metrics.jsonl
        self.last_checkpoint: Path | None = None
        self.stale_steps: set[int] = set()  # after a resume: checkpoint steps of the replaced run
        self._stop_reason: str | None = None
        self._in_update = False  # inside the weight update: an interrupt there cannot be saved consistently
        self._saved_step: int | None = None
        self._boundary: dict[str, Any] = {}  # data position and RNG at the last step boundary

    def _setup_data(self, cache_dir: str | Path | None) -> None:
        """Tokenize (rank 0 first, into the cache; the others then read it), the sampler, the eval batches."""
        cfg, dist = self.cfg, self.dist
        if not self.is_main:
            dist_utils.barrier(dist)
        self.tokenizer, self.train_tokens, self.val_tokens = prepare_data(cfg, cache_dir)
        if self.is_main:
            dist_utils.barrier(dist)
        self.sampler = BatchSampler(
            self.train_tokens,
            cfg.batch_size,
            cfg.max_seq_len,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
        )
        self.val_batches = eval_batches(
            self.val_tokens, cfg.batch_size, cfg.max_seq_len, cfg.eval_batches, dist.rank, dist.world_size
        )
        self.unigram_loss = unigram_baseline(self.train_tokens, self.val_tokens, self.tokenizer.vocab_size)

    def _setup_model(self, cpu_bf16: bool | None) -> None:
        """The model, the precision switch, and the FLOP figures MFU is measured with."""
        cfg = self.cfg
        # Every rank seeds alike, so all start from the same weights. (The ranks then also draw the
        # same dropout masks, on different data: one RNG state, rank 0's, is then the state of
        # every rank, which keeps a DDP resume exact.)
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(cfg).to(self.device)  # the plain module: its state dict is what we save
        if cfg.parallelism == "fsdp" and self.dist.enabled:  # sharded in place, before the optimizer exists
            dist_utils.apply_fsdp(self.raw_model, cfg, reshard_after_forward=cfg.reshard_after_forward)
        self.autocast, self.scaler, self.precision_name = mixed_precision(cfg, self.device, cpu_bf16)
        self.flops_per_token = flops_per_token(cfg)  # model FLOPs (forward + backward) per trained token
        self.peak_flops, self.peak_source = device_peak_flops(self.device, autocast_dtype(cfg, self.device, cpu_bf16))
        # On a CPU a long run compiles even when the config does not ask (minilm.compile_policy).
        self.compile, self.compile_reason = compile_decision(cfg, self.device, self.flops_per_token)

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
        if self._run_lock is not None:
            self._run_lock.release()
        dist_utils.cleanup(self.dist)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of a throughput (all processes) against the devices' peak; None on a CPU."""
        if not self.peak_flops:
            return None
        return model_flops_utilisation(tokens_per_s, self.cfg, self.peak_flops, self.dist.world_size)

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop (a signal may reach only some): all ranks must agree."""
        if not self.dist.enabled:
            return self._stop_reason is not None  # one process: no collective, no device round trip
        flag = torch.tensor(float(self._stop_reason is not None), device=self.device)
        return float(dist_utils.all_reduce_sum(flag, self.dist)) > 0

    def log(self, msg: str) -> None:
        if self.verbose:
            report.print_line(msg, self.progress)

    # -- the pieces of one step ---------------------------------------------------------
    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accumulation_steps`` micro-batches for the next step, on the device."""
        non_blocking = self.device.type == "cuda"
        return [
            tuple(t.to(self.device, non_blocking=non_blocking) for t in self.sampler.next_batch())
            for _ in range(self.cfg.grad_accumulation_steps)
        ]

    def compute_gradients(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over the micro-batches (:func:`minilm.step.accumulate_gradients`).

        k micro-batches of B sequences give the gradient of one batch of k·B; under DDP only
        the last backward all-reduces. Returns this rank's mean loss (a detached device scalar).
        """
        no_sync = dist_utils.no_sync(self.model, self.dist)
        return one_step.accumulate_gradients(
            self.model, micro_batches, self.autocast, self.scaler, no_sync=no_sync, chunked_loss=True
        )

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16 only) and clip the global gradient norm; returns the norm before clipping (device scalar)."""
        params = list(self.raw_model.parameters())
        return one_step.clip_gradients(params, self.optimizer, self.scaler, self.cfg.grad_clip)

    def optimizer_step(self) -> None:
        """AdamW step (fp16: skipped by the scaler when gradients overflowed), then zero the gradients."""
        one_step.optimizer_step(self.optimizer, self.scaler)

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
        """Optimizer, scaler, RNG, sampler position and counters (:func:`minilm.resume.training_state`)."""
        return resume.training_state(self)

    def save_checkpoint(self, state: dict[str, Any] | None = None) -> Path | None:
        """Write ``output_dir/checkpoint-{step}`` (all ranks take part: :func:`minilm.resume.save`); return its path."""
        path = resume.save(self, state)
        self._saved_step = self.step
        if path is not None:
            self.last_checkpoint = path
            self._fire("on_checkpoint", {"kind": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.is_main:
            runs.append_record(self.metrics_path, rec)

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run from ``self.step`` to ``cfg.max_steps``; returns a :class:`TrainResult`.

        Stops early, saving a checkpoint first, on SIGINT/SIGTERM, KeyboardInterrupt or
        :meth:`request_stop`. A non-finite loss or gradient stops the run before the weights
        change, without saving, so the last checkpoint on disk is the last good one.
        """
        cfg = self.cfg
        self.clock = StepClock(time.perf_counter())
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"training steps {self.step} -> {cfg.max_steps}; metrics in {self.metrics_path}")
        self._fire("on_train_start", {"kind": "start", "step": self.step})
        restore = self._install_signal_handlers()
        bar = report.progress_bar(self.progress, total=cfg.max_steps, initial=self.step)
        status, message = "completed", f"reached max_steps={cfg.max_steps}"
        self.last_loss: float | None = None
        self.last_eval = next((r for r in reversed(self.history) if r["kind"] == "eval"), None)  # after a resume
        self.raw_model.train()
        self._boundary = resume.data_position(self)
        try:
            while self.step < cfg.max_steps:
                failure = self._train_step(bar)
                if failure is not None:
                    status, message = "non_finite", failure
                    break
                self._evaluate_and_save()
                if self._stop_requested():
                    status, message = "interrupted", self._stop_and_save()
                    break
        except KeyboardInterrupt:
            status, message = "interrupted", self._save_after_keyboard_interrupt()
        finally:
            bar.close()
            restore()
        return self._finish(status, message)

    def _train_step(self, bar: report.ProgressBar) -> str | None:
        """One optimizer step, logged; returns why it stopped the run (a non-finite value) or None."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.compute_gradients(self.next_micro_batches())
        loss = dist_utils.all_reduce_sum(loss, self.dist) / self.dist.world_size
        grad_norm = self.clip_gradients()  # the same on every rank: gradients are all-reduced
        # The step's one host synchronisation: both numbers in one transfer.
        loss_value, grad_norm_value = torch.stack([loss, grad_norm.float()]).tolist()
        self.last_loss = loss_value
        # Stop before the weights change. (fp16: the scaler itself skips overflowed gradients.)
        bad = "loss" if not math.isfinite(loss_value) else None
        if bad is None and not math.isfinite(grad_norm_value) and not self.scaler.is_enabled():
            bad = "gradient norm"
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return self._non_finite_message(bad, loss_value if bad == "loss" else grad_norm_value)
        tokens = cfg.tokens_per_step
        self._in_update = True  # a KeyboardInterrupt in here cannot be saved consistently
        self.optimizer_step()
        # Everything a checkpoint of this step holds changes in here, so that an interrupt
        # just after it saves step N with step N's counters, not step N-1's.
        self.step += 1
        self.tokens_seen += tokens
        self._boundary = resume.data_position(self)
        self._in_update = False
        dt = time.perf_counter() - t0
        self.clock.add(dt, tokens)
        rec = {
            "kind": "train",
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens / dt,
            **({"mfu": self.mfu(tokens / dt)} if self.peak_flops else {}),
            "time_s": time.perf_counter() - self.clock.start,
        }
        self._record(rec)
        self._fire("on_step_end", rec)
        postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens / dt:,.0f}"}
        if self.peak_flops:
            postfix["mfu"] = f"{rec['mfu']:.1%}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        return None

    def _evaluate_and_save(self) -> None:
        """Evaluate every ``eval_steps`` and checkpoint every ``save_steps`` (and both at the end)."""
        last = self.step == self.cfg.max_steps
        if self.step % self.cfg.eval_steps == 0 or last:
            self.last_eval = self._eval_and_record()
        if self.step % self.cfg.save_steps == 0 or last:
            self.save_checkpoint()

    def _stop_and_save(self) -> str:
        """A stop was requested (signal or request_stop): save this step unless just saved."""
        message = f"{self._stop_reason or 'another process was interrupted'} at step {self.step}"
        if self._saved_step != self.step:
            self.save_checkpoint()
        return message

    def _save_after_keyboard_interrupt(self) -> str:
        """A second Ctrl-C, or an interrupt no handler caught (e.g. training in a thread)."""
        if self._in_update:
            return f"interrupted during the weight update of step {self.step + 1}: nothing saved"
        # Drop the half-done step: save the data position and RNG from the last step boundary.
        self.optimizer.zero_grad(set_to_none=True)
        self.save_checkpoint({**self.training_state(), **self._boundary})
        return f"KeyboardInterrupt at step {self.step}"

    def _finish(self, status: str, message: str) -> TrainResult:
        """Sample (rank 0), wait for every rank, and report."""
        sample = None
        sharded = dist_utils.is_sharded(self.raw_model)  # FSDP: every forward is collective, all ranks sample
        if status == "completed" and (self.is_main or sharded) and self.sample_tokens > 0:
            sample = self.sample(max_new_tokens=self.sample_tokens)
        # The other ranks wait while rank 0 samples, so that none tears down the process group
        # (Trainer.close) while another still works: under load that raced gloo's shutdown.
        dist_utils.barrier(self.dist)
        result = train_result(self, status, message, sample)
        if self.verbose:
            print(run_summary(self, result))
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
        if not self.handle_signals:
            return lambda: None
        return stop_on_signals(self, announce=self.is_main, progress=self.progress)


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """``Trainer(cfg, **kwargs).train()``."""
    return Trainer(cfg, **kwargs).train()
