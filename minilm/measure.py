"""Measure the real peak memory of one training step, to check :mod:`minilm.memory` against.

Two instruments, one definition of "peak":

* **CPU** — :class:`LiveStorageTracker`, a ``TorchDispatchMode`` that sees every tensor an
  operator returns, adds its storage's bytes the first time it sees that storage, and
  subtracts them when the storage is freed (a weakref callback on the untyped storage).
  The total is sampled after every operator; the largest sample is the peak. Views and
  in-place results share a storage and are not counted twice.
* **CUDA** — ``torch.cuda.max_memory_allocated()``: the caching allocator's own count of
  bytes held by live tensors (rounded up to its 512-byte blocks).

**What "peak" means here.** The largest number of bytes held at once by live tensors
during one *steady-state* optimizer step: forward, loss, backward, gradient clipping,
``AdamW.step()`` and ``zero_grad(set_to_none=True)``, for each of the step's micro-batches.
Steady state means the optimizer has already stepped once, so its two moment buffers
exist before the forward starts (Adam creates them lazily, at the first ``step()``: the
very first step peaks lower). Parameters, Adam state and the input batch count, since
they are alive during the step.

Neither instrument sees memory that is not a tensor: the CUDA context, cuBLAS / cuDNN /
NCCL workspaces, scratch buffers a kernel allocates outside the dispatcher, the caching
allocator's reserved-but-unused blocks, or fragmentation. That is why ``nvidia-smi``
shows more (see :data:`minilm.memory.NOT_COUNTED`).

    >>> from minilm import Config
    >>> from minilm.measure import measure_training_step
    >>> cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, batch_size=4)
    >>> m = measure_training_step(cfg)
    >>> m.peak_bytes, m.phase_peak_bytes["backward"]
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minilm import step
from minilm.config import Config
from minilm.model import GPT
from minilm.optim import make_optimizer
from minilm.precision import autocast_context, requested_dtype

# The cases the memory estimate is validated on: tests/test_memory.py asserts them (within
# 10%), benchmarks/estimator_accuracy.py prints them. Shapes are tiny so the checks are fast,
# but chosen so that activations and logits are a large part of the peak at batch 4 x 256.
VALIDATION_SHAPES = {
    "d64-L2-V512": dict(vocab_size=512, d_model=64, n_heads=4, n_layers=2),
    "d128-L3-V1024": dict(vocab_size=1024, d_model=128, n_heads=4, n_layers=3),
    "d192-L2-V2048": dict(vocab_size=2048, d_model=192, n_heads=6, n_layers=2),
}
# batch, sequence length, gradient checkpointing, bf16: 16 settings per shape
VALIDATION_GRID = tuple(itertools.product((1, 4), (64, 256), (False, True), (False, True)))
# Other variants, each applied to VARIANT_BASE.
VARIANT_BASE = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, batch_size=2)
VALIDATION_VARIANTS = {
    "manual fp32": dict(attention="manual"),
    "manual bf16 ckpt": dict(attention="manual", bf16=True, gradient_checkpointing=True),
    "sdpa dropout (CPU math path)": dict(dropout=0.1),
    "sdpa dropout bf16 ckpt": dict(dropout=0.1, bf16=True, gradient_checkpointing=True),
    "manual dropout": dict(attention="manual", dropout=0.1),
    "accumulation x2": dict(grad_accumulation_steps=2),
    "accumulation x2 bf16 ckpt": dict(grad_accumulation_steps=2, bf16=True, gradient_checkpointing=True),
    "untied, no bias, d_ff 96": dict(tie_embeddings=False, bias=False, d_ff=96),
    "fp16 autocast + scaler": dict(fp16=True),
    "one head, batch 1": dict(n_heads=1, batch_size=1),
    # head size 64 at 256 tokens: the CPU attention kernel runs in bf16 (minilm.attention.sdpa_in_fp32)
    "bf16 attention kernel (head 64, seq 256)": dict(d_model=128, n_heads=2, max_seq_len=256, bf16=True),
}


class LiveStorageTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages on one device type; remember the peak.

    Use as a context manager around the code to measure. Tensors created before the
    context (parameters, optimizer state, the batch) must be registered with
    :meth:`track`, or they are invisible. ``phase`` labels the peak of each part of a step.
    ``follow_resizes=True`` (sharded training, :mod:`minilm.measure_ranks`) also follows storages
    that grow or shrink in place, as FSDP2's gathered parameters do (allocated at size 0, then
    resized), at the cost of a look at every live storage after each operator.
    """

    def __init__(self, device_type: str = "cpu", record: bool = False, follow_resizes: bool = False):
        super().__init__()
        self.device_type = device_type
        self.follow_resizes = follow_resizes
        self.timeline: list[tuple[str, str, int]] | None = [] if record else None  # (phase, op, live bytes)
        self.current = 0  # bytes held by live storages now
        self.peak = 0  # the largest value of ``current`` seen after any operator
        self.peak_op = ""  # the operator after which the peak was seen
        self.phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # storage id -> (weakref, bytes)

    def track(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors that existed before the tracker started (parameters, optimizer state...)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self._sample("track")

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks.setdefault(phase, self.current)

    def _add(self, t: torch.Tensor) -> None:
        if isinstance(t, DTensor):  # a sharded parameter (FSDP2): this process holds its local shard
            t = t._local_tensor
        if t.device.type != self.device_type or t.is_meta:
            return
        st = t.untyped_storage()
        key = st._cdata  # address of the C++ StorageImpl: unique while the storage lives
        if key in self._live or (st.nbytes() == 0 and not self.follow_resizes):
            return

        def _freed(_ref: weakref.ref, key: int = key) -> None:
            # Runs when the storage's last reference (tensor, view, autograd's saved copy) dies.
            _, nbytes = self._live.pop(key)
            self.current -= nbytes

        self._live[key] = (weakref.ref(st, _freed), st.nbytes())
        self.current += st.nbytes()

    def _sample(self, label: str) -> None:
        if self.follow_resizes:
            for key, (ref, nbytes) in list(self._live.items()):
                st = ref()
                if st is not None and st.nbytes() != nbytes:
                    self._live[key] = (ref, st.nbytes())
                    self.current += st.nbytes() - nbytes
        if self.timeline is not None:
            self.timeline.append((self.phase, label, self.current))
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, f"{self.phase}: {label}"
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        # Sampled while the inputs are still referenced: the moment the output exists.
        self._sample(str(func))
        return out


@dataclass
class MeasuredMemory:
    """The measured peak of one steady-state training step, in bytes."""

    peak_bytes: int
    phase_peak_bytes: dict[str, int]  # "forward", "backward", "optimizer" (per micro-batch phases merged)
    start_bytes: int  # live before the step: parameters + optimizer state + batch
    peak_at: str  # where the peak happened (CPU: phase and operator; CUDA: phase)
    device: str
    method: str  # which instrument measured it
    notes: list[str] = field(default_factory=list)
    timeline: list[tuple[str, str, int]] | None = None  # CPU with record=True: (phase, operator, live bytes)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


def _micro_steps(cfg: Config) -> int:
    # Micro-batch 2 onward all look alike (gradients already exist), so two are enough.
    return min(cfg.grad_accumulation_steps, 2)


def _one_step(
    model: GPT,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    scaler: torch.amp.GradScaler,
    set_phase: Callable[[str], None],
    keep_logits: bool = False,
    chunked_loss: bool = False,
) -> None:
    """One optimizer step through :mod:`minilm.step`, the trainer's own step, in the precision asked.

    As asked, whatever the hardware: the trainer may run fp32 on a CPU without native bf16
    (:func:`minilm.precision.autocast_dtype`), but the memory question is about the config.
    It runs the first two of the config's micro-batches (later ones repeat the second).
    """
    device = batches[0][0].device
    autocast = autocast_context(device, requested_dtype(cfg))
    step.accumulate_gradients(
        model, batches, autocast, scaler, keep_logits=keep_logits, chunked_loss=chunked_loss, set_phase=set_phase
    )
    set_phase("optimizer")
    step.clip_gradients(list(model.parameters()), opt, scaler, cfg.grad_clip)
    step.optimizer_step(opt, scaler)


def _prepared(cfg, batch_size, seq_len, device, optimizer, seed, keep_logits, chunked_loss=False):
    """Model, optimizer, scaler and batches, after one warm-up step (which creates AdamW's state)."""
    device = torch.device(device)
    b = batch_size or cfg.batch_size
    s = seq_len or cfg.max_seq_len
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    model.train()
    opt = make_optimizer(model, cfg, impl=optimizer, verbose=False)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)
    gen = torch.Generator().manual_seed(seed)
    batches = [
        tuple(torch.randint(0, cfg.vocab_size, (b, s), generator=gen).to(device) for _ in range(2))
        for _ in range(_micro_steps(cfg))
    ]
    _one_step(model, opt, batches, cfg, scaler, lambda phase: None, keep_logits, chunked_loss)
    return model, opt, scaler, batches


def measure_training_step(
    cfg: Config,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device = "cpu",
    optimizer: str = "fused",
    keep_logits: bool = False,
    seed: int = 0,
    record: bool = False,
    chunked_loss: bool = False,
    compiled: bool = False,
    instrument: str | None = None,
) -> MeasuredMemory:
    """Build ``GPT(cfg)``, take one warm-up step, then measure the peak of the next step.

    ``batch_size`` and ``seq_len`` default to ``cfg.batch_size`` and ``cfg.max_seq_len``.
    The step runs ``min(cfg.grad_accumulation_steps, 2)`` micro-batches (later ones repeat
    the second). ``optimizer`` is AdamW's implementation ('fused', as minilm's trainer uses;
    'foreach'; 'for-loop'). ``keep_logits=True`` holds the logits in a variable through
    backward, as ``logits, loss = model(x, y)`` does; ``chunked_loss=True`` computes the loss as
    the trainer does, ``model(x, y, return_logits=False)`` (:mod:`minilm.loss`). ``record=True`` keeps the CPU timeline
    of (phase, operator, live bytes), to plot memory over the step. CPU uses
    :class:`LiveStorageTracker`; CUDA uses the allocator's counters.

    ``compiled=True`` measures the step of ``minilm.compile_policy.compile_model(model)``,
    as the trainer compiles it (after a second warm-up step, which compiles). Inductor's
    buffers are allocated outside the dispatcher, where :class:`LiveStorageTracker` cannot
    see them, so on a CPU the compiled step is measured by :func:`measure_cpu_allocations`.
    ``instrument`` chooses on a CPU: 'tracker' (the default eagerly; no compiled step) or
    'allocator' (the default compiled).
    """
    instrument = instrument or ("allocator" if compiled else "tracker")
    if instrument not in ("tracker", "allocator"):
        raise ValueError(f"instrument must be 'tracker' or 'allocator', got {instrument!r}")
    if compiled and instrument == "tracker":
        raise ValueError("the tracker cannot see a compiled step's buffers: use instrument='allocator'")
    if record and instrument == "allocator":
        raise ValueError("record=True keeps the tracker's per-operator timeline: use instrument='tracker'")
    model, opt, scaler, batches = _prepared(
        cfg, batch_size, seq_len, device, optimizer, seed, keep_logits, chunked_loss
    )
    device = torch.device(device)
    if compiled:
        from minilm.compile_policy import compile_model

        model = compile_model(model, device)
        _one_step(model, opt, batches, cfg, scaler, lambda phase: None, keep_logits, chunked_loss)
    if device.type == "cuda":
        return _measure_cuda(model, opt, batches, cfg, scaler, device, keep_logits, chunked_loss)
    tracker = LiveStorageTracker(device.type, record=record)
    # Alive before the step (parameters, optimizer state, the batch), each storage counted once.
    tracker.track([*model.parameters(), *_optimizer_tensors(opt), *(t for bt in batches for t in bt)])
    start = tracker.current
    if instrument == "allocator":
        return measure_cpu_allocations(
            lambda set_phase: _one_step(model, opt, batches, cfg, scaler, set_phase, keep_logits, chunked_loss), start
        )
    with tracker:
        _one_step(model, opt, batches, cfg, scaler, tracker.set_phase, keep_logits, chunked_loss)
    return MeasuredMemory(
        peak_bytes=tracker.peak,
        phase_peak_bytes={k: v for k, v in tracker.phase_peaks.items() if k != "setup"},
        start_bytes=start,
        peak_at=tracker.peak_op,
        device=str(device),
        method="LiveStorageTracker (TorchDispatchMode, live untyped-storage bytes)",
        timeline=tracker.timeline,
    )


_PHASE_MARK = "minilm.measure.phase:"


def measure_cpu_allocations(run: Callable[[Callable[[str], None]], None], start_bytes: int) -> MeasuredMemory:
    """Peak bytes of ``run(set_phase)`` from the CPU allocator's own records, plus ``start_bytes``.

    ``torch.profiler`` with ``profile_memory=True`` logs every allocation and free that goes
    through PyTorch's CPU allocator while it runs, in time order; the running sum of their
    sizes, plus what was alive before (``start_bytes``: frees of older blocks are logged as 0
    bytes), is the live total at each moment. It sees what :class:`LiveStorageTracker` cannot:
    buffers that torch.compile's generated code allocates, and buffers an operator allocates
    inside itself and never returns (``scatter_``'s, in the loss). On fp32 eager steps of the d128
    validation shape the two instruments agreed to the byte at 4 × 256, 1 × 256 and 4 × 64
    (``tests/test_memory.py``). At 1 × 64 the tracker's backward peak was 480 KiB higher, and so
    is this instrument's when any ``TorchDispatchMode`` is active, even a pass-through: a mode
    changes the step it watches there (apparently autograd then sums the tied embedding's two
    gradients out of place). In bf16 this one reads up to ~10% more.
    ``set_phase(name)`` marks where each phase begins (a zero-length profiler range).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    def set_phase(phase: str) -> None:
        with record_function(_PHASE_MARK + phase):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(set_phase)
    events = prof.profiler.kineto_results.events()
    marks = sorted(
        (e.start_ns(), e.name().removeprefix(_PHASE_MARK)) for e in events if e.name().startswith(_PHASE_MARK)
    )
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current, peak, peak_at, phase, phases = start_bytes, start_bytes, "setup", "setup", {}
    marks.append((float("inf"), "end"))
    i = 0
    for t, nbytes in changes:
        while marks[i][0] <= t:
            phase = marks[i][1]
            phases.setdefault(phase, current)
            i += 1
        current += nbytes
        if current > peak:
            peak, peak_at = current, phase
        phases[phase] = max(phases.get(phase, 0), current)
    return MeasuredMemory(
        peak_bytes=peak,
        phase_peak_bytes={k: v for k, v in phases.items() if k != "setup"},
        start_bytes=start_bytes,
        peak_at=peak_at,
        device="cpu",
        method="torch.profiler(profile_memory=True): the CPU allocator's allocations and frees",
        notes=["counts every block PyTorch's CPU allocator hands out, kernel scratch included"],
    )


def _measure_cuda(model, opt, batches, cfg, scaler, device, keep_logits, chunked_loss=False) -> MeasuredMemory:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    phases: dict[str, int] = {}
    current = ["setup"]

    def set_phase(phase: str) -> None:
        # Close the previous phase: its peak is the allocator's high-water mark since the last reset.
        torch.cuda.synchronize(device)
        prev = current[0]
        if prev != "setup":
            phases[prev] = max(phases.get(prev, 0), torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        current[0] = phase

    torch.cuda.reset_peak_memory_stats(device)
    _one_step(model, opt, batches, cfg, scaler, set_phase, keep_logits, chunked_loss)
    set_phase("done")
    peak_phase = max(phases, key=phases.get)
    return MeasuredMemory(
        peak_bytes=max(phases.values()),
        phase_peak_bytes=phases,
        start_bytes=start,
        peak_at=peak_phase,
        device=str(device),
        method="torch.cuda.max_memory_allocated",
        notes=["counts live tensor bytes rounded to the allocator's 512-byte blocks; not reserved or context memory"],
    )


def measure_with_memtracker(
    cfg: Config,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    optimizer: str = "fused",
    keep_logits: bool = False,
    seed: int = 0,
) -> int:
    """The same steady-state step on CPU, measured by PyTorch's own ``MemTracker``: peak bytes.

    An instrument minilm did not write (``torch.distributed._tools.mem_tracker``), to check
    :class:`LiveStorageTracker` against. Same setup and step as :func:`measure_training_step`.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    model, opt, scaler, batches = _prepared(cfg, batch_size, seq_len, "cpu", optimizer, seed, keep_logits)
    tracker = MemTracker()
    tracker.track_external(model, opt, *[t for bt in batches for t in bt])

    def set_phase(phase: str) -> None:
        if phase == "forward":
            tracker.reset_mod_stats()  # MemTracker's per-module stats refuse a second forward otherwise

    with tracker:
        _one_step(model, opt, batches, cfg, scaler, set_phase, keep_logits)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
