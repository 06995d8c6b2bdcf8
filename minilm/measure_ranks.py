"""Measure each rank's peak memory under DDP, ZeRO-1, ZeRO-2 and ZeRO-3 (FSDP2), on CPU processes.

The check for :mod:`minilm.sharding`: start ``world_size`` processes (gloo), build the same
model on each, wrap it as the strategy does, take one warm-up step (AdamW's state appears)
and measure the next step with a tracker per rank. Everything from the model's creation on
happens inside the tracker, so DDP's gradient buckets (allocated when DDP wraps), the
ZeRO-1 optimizer's share of AdamW's state and FSDP's shards, all-gather buffers and
reduce-scatter buffers are all seen.

Two things the plain :class:`minilm.measure.LiveStorageTracker` cannot see, handled here:

* FSDP2 frees a gathered parameter with ``untyped_storage().resize_(0)`` and brings it back
  with ``resize_(n)``, which keeps the storage object alive and changes its size outside
  the dispatcher: :class:`ShardAwareTracker` re-reads every live storage's size after each
  operator.
* Sharded parameters, their gradients and AdamW's state are ``DTensor`` wrappers: the
  tracker counts the local tensor each one wraps.

Not seen, as on one process: buffers gloo allocates on its own threads for a collective
(the counterpart of NCCL's buffers on GPUs).

    >>> from minilm import Config
    >>> cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=32, batch_size=2)
    >>> measure_rank_peaks(cfg, ("ddp", "zero3"), world_size=2)  # {'ddp': [bytes, bytes], ...}
"""

from __future__ import annotations

import os
import queue as queue_module
import tempfile
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minilm import step
from minilm.config import Config
from minilm.distributed import leave_process_group
from minilm.measure import LiveStorageTracker
from minilm.model import GPT
from minilm.optim import make_optimizer

MEASURED_STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def zero1_optimizer(model: torch.nn.Module, cfg: Config, *, impl: str = "fused") -> torch.optim.Optimizer:
    """ZeRO-1: PyTorch's ``ZeroRedundancyOptimizer`` over the AdamW that :func:`make_optimizer` builds.

    The same two weight-decay groups and hyperparameters; each rank keeps AdamW's state (and
    steps) only for the whole tensors its greedy partition gives it, then broadcasts them.
    Measured here only: minilm's trainer does not run ZeRO-1.
    """
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    adamw = make_optimizer(model, cfg, impl=impl, verbose=False)  # no state yet: AdamW makes it at step 1
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups]
    accepted = inspect.signature(type(adamw)).parameters  # defaults also hold internal flags AdamW() refuses
    defaults = {k: v for k, v in adamw.defaults.items() if k in accepted and k != "weight_decay"}
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(adamw), **defaults)


def _wrap(model: GPT, cfg: Config, strategy: str) -> torch.nn.Module:
    from minilm.distributed import apply_fsdp

    if strategy in ("ddp", "zero1"):  # ZeRO-1 is DDP with a sharded optimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    return apply_fsdp(model, cfg, reshard_after_forward=strategy == "zero3")


def _rank_peak(cfg: Config, strategy: str, rank: int, seed: int, optimizer: str) -> int:
    """This rank's peak bytes during its second training step under ``strategy``."""
    tracker = LiveStorageTracker("cpu", follow_resizes=True)
    with tracker:
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = _wrap(GPT(cfg), cfg, strategy)
        if strategy == "zero1":
            opt = zero1_optimizer(model, cfg, impl=optimizer)
        else:
            opt = make_optimizer(model, cfg, impl=optimizer, verbose=False)
        gen = torch.Generator().manual_seed(seed + 1 + rank)  # each rank its own micro-batch
        shape = (cfg.batch_size, cfg.max_seq_len)
        batches = [tuple(torch.randint(0, cfg.vocab_size, shape, generator=gen) for _ in range(2))]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(2):  # warm-up (creates AdamW's state), then the measured step
            tracker.peak = tracker.current
            step.accumulate_gradients(model, batches, nullcontext(), scaler, chunked_loss=True)  # the trainer's loss
            step.clip_gradients(list(model.parameters()), opt, scaler, cfg.grad_clip)
            step.optimizer_step(opt, scaler)
        del model, opt
    return tracker.peak


def _worker(rank: int, world_size: int, store: str, jobs: list, seed: int, optimizer: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        for key, cfg, strategy in jobs:
            queue.put((key, strategy, rank, _rank_peak(cfg, strategy, rank, seed, optimizer)))
            dist.barrier()
    finally:
        leave_process_group()


def measure_rank_peaks(
    cfg: Config | dict[str, Config],
    strategies: tuple[str, ...] = MEASURED_STRATEGIES,
    *,
    world_size: int = 2,
    seed: int = 0,
    optimizer: str = "fused",
) -> dict:
    """Each rank's measured peak (bytes) under each strategy, on ``world_size`` CPU processes.

    ``cfg`` is one config (returns ``{strategy: [rank 0, rank 1, ...]}``) or a dict of named
    configs (returns ``{name: {strategy: [...]}}``), all measured by one set of processes.
    fp32 only: the batch is ``cfg.batch_size`` x ``cfg.max_seq_len`` per rank, one micro-batch.
    """
    named = cfg if isinstance(cfg, dict) else {"": cfg}
    for c in named.values():
        if c.precision != "fp32" or c.grad_accumulation_steps != 1:
            raise ValueError("measure_rank_peaks measures fp32 steps of one micro-batch (fields 'bf16', 'fp16', ...)")
    for s in strategies:
        if s not in MEASURED_STRATEGIES:
            raise ValueError(f"strategy must be one of {MEASURED_STRATEGIES}, got {s!r}")
    jobs = [(key, c.replace(world_size=world_size), s) for key, c in named.items() for s in strategies]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, jobs, seed, optimizer, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results = []
        try:
            while len(results) < len(jobs) * world_size:
                try:
                    results.append(queue.get(timeout=5))
                except queue_module.Empty:
                    # A rank that died (an exception, out of memory) never reports: fail, do not wait forever.
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a measuring process failed (exit codes {dead})") from None
            for p in procs:
                p.join(timeout=60)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    out: dict = {key: {s: [0] * world_size for s in strategies} for key in named}
    for key, s, rank, peak in results:
        out[key][s][rank] = peak
    return out if isinstance(cfg, dict) else out[""]
