"""How much memory training needs, estimated in closed form and returned as a breakdown.

Training memory has two halves. **Model state** scales with the parameter count N and
lives for the whole run: fp32 weights (4N bytes), fp32 gradients (4N) and AdamW's two
moment buffers (8N) — 16 bytes per parameter. ``torch.autocast`` (bf16/fp16) does not
change this: the parameters stay fp32 (they *are* the "master weights") and autocast
casts low-precision copies of them for each matmul. **Activations** scale with batch ×
sequence: every tensor the forward pass saves for backward, plus the logits, which at a
large vocabulary are often the largest single allocation of the step.

Notation: b batch, s sequence length, d d_model, a heads, f d_ff, V vocab, L layers,
e bytes per activation element (4 in fp32, 2 under bf16/fp16 autocast). All values are
bytes.

Saved for backward by one block (no checkpointing, SDPA, no dropout)::

    residual stream (LayerNorm inputs, always fp32)  2 · 4·b·s·d
    LayerNorm statistics (mean, 1/std; fp32)          4 · 4·b·s
    inputs of the four Linear layers                  e·b·s·(3d + f)
    q, k, v                                           3 · e·b·s·d
    GELU input                                        e·b·s·f
    attention: SDPA logsumexp (fp32)                  4·a·b·s
               manual: softmax probabilities           e·a·b·s²   (+ an s² bool causal mask)
    dropout > 0: masks (m bytes each: 1 on CUDA, e on CPU)   2·m·b·s·d  + attention: (m + e)·a·b·s²
    autocast: low-precision weight copies             2 · (4d² + 2·d·f)

In fp32 with f = 4d that is 64·b·s·d bytes, i.e. 16 numbers per token per layer
(Korthikanti et al. 2022 count 34·b·s·d in bytes at e = 2, with masks and s² terms).
Gradient checkpointing keeps only each block's fp32 input (4·b·s·d) and rebuilds one
block at a time during backward. On CPU under autocast, minilm runs SDPA in fp32 at short
sequences (:func:`minilm.attention.sdpa_in_fp32`), so there q, k, v and the attention output
are saved in fp32.

The logits: the LM head writes b·s·V logits (e bytes each), cross-entropy upcasts them to
fp32 and saves fp32 log-probabilities (4·b·s·V). Early in backward two more fp32 b·s·V
tensors exist at once (the gradient of the loss w.r.t. the log-probs, then w.r.t. the
logits): 12·b·s·V bytes for one moment. The trainer's chunked loss (:mod:`minilm.loss`,
``chunked_loss=True``) never builds them: it holds the head's gradients (4·V·d + 4·b·s·d)
from its forward call on, and one chunk's logits at a time (:func:`chunked_loss_bytes`).

**Peak.** Memory rises through the forward pass and falls through backward while
gradients appear, so the peak is one of a few moments. The estimate adds up what is
alive at each and takes the largest (``MemoryEstimate.moments``):

* last block forward — the blocks below + one block at its busiest (with checkpointing:
  that block rebuilt first in backward, next to the head's gradient)
* forward end — saved activations + logits being turned into log-probs
* loss backward — saved activations + 3 × b·s·V fp32 tensors
* last / first block backward — remaining activations + gradients so far + the block's
  backward temporaries (+ the recomputed block with checkpointing)
* embedding backward — all gradients, plus the tied embedding's two extra V·d gradients
* optimizer step — weights + gradients + Adam state + the optimizer's temporaries: none
  for the fused kernel minilm's trainer uses, 4 bytes per parameter of the larger
  parameter group for foreach, two tensors' worth for the for-loop

With gradient accumulation every moment from the second micro-batch on also holds the
gradients (4N), which is why "halve the batch, double the accumulation" saves less than
half the activations' worth.

"Peak" means the same as in :mod:`minilm.measure`: the most bytes held by live tensors at
once during a steady-state step (Adam state already exists). It is checked against that
measurement on CPU (``tests/test_memory.py``, ``benchmarks/estimator_accuracy.py``); the
few CUDA-only rules (bool dropout masks, fp32 softmax under autocast, flash attention
with dropout) follow PyTorch's kernels and autocast lists and are not measured in CI.
See :data:`NOT_COUNTED` for what neither counts.

    >>> from minilm.config import load_config
    >>> est = estimate_training_memory(load_config("configs/training/small_model.json"))
    >>> print(est.table())
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from minilm import attention
from minilm.config import Config
from minilm.counting import count_parameters, parameter_shapes
from minilm.loss import chunk_rows

GB = 1024**3  # memory sizes are binary: 1 GiB, what nvidia-smi and torch.cuda report

NOT_COUNTED = """\
Not counted (by this estimate or by the measurement it is checked against):
  - the CUDA context: the driver's and PyTorch's kernels loaded on the GPU, ~0.3-1.3 GB
    per process depending on the GPU, driver and CUDA version, before any tensor exists;
  - library workspaces that bypass PyTorch's allocator: cuDNN and flash-attention scratch,
    NCCL communication buffers under DDP (the cuBLAS workspaces *are* counted: PyTorch
    allocates them through its caching allocator, see :func:`cublas_workspace_bytes`);
  - the caching allocator's overhead: blocks rounded up (512 B, 2 MB segments), memory
    reserved but not in use (torch.cuda.memory_reserved() - memory_allocated()),
    fragmentation;
  - other processes on the same GPU, the data loader's pinned host buffers (host RAM).
nvidia-smi reports the sum of all of these plus the tensors, so it shows more than
torch.cuda.max_memory_allocated(), which is what this estimate predicts. Leave
10-20% headroom (and ~1 GB for the context) when choosing a GPU."""

OPTIMIZER_IMPLS = ("foreach", "for-loop", "fused")

MIB = 2**20


def cublas_workspace_bytes(capability: tuple[int, int] | None = None, threads: int = 2) -> int:
    """Bytes of cuBLAS workspace a training step holds on a CUDA device (in max_memory_allocated).

    PyTorch gives every (cuBLAS handle, stream) pair a workspace from its caching allocator and
    keeps it for the life of the process. Handles are per thread, and autograd runs backward on
    its own device thread, so a training step uses ``threads`` = 2 workspaces: the forward's and
    the backward's. PyTorch's default size (ATen's ``parseChosenWorkspaceSize``) is 32 MiB on
    Hopper (compute capability 9.0) and 8 MiB + 128 KiB elsewhere; ``CUBLAS_WORKSPACE_CONFIG``
    (``:SIZE_KiB:COUNT`` pairs) overrides it. ``capability`` None: the current CUDA device's, or
    Hopper's when there is none (the datacenter GPUs this is planned for).
    """
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":(\d+):(\d+)", config or "")
    if pairs:
        size = sum(int(kib) * 1024 * int(count) for kib, count in pairs)
    else:
        if capability is None:
            capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        size = 32 * MIB if tuple(capability) == (9, 0) else 8 * MIB + 128 * 1024
    return threads * size


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one transformer block saves for its backward pass (as saved without checkpointing)."""

    residual: int  # the two LayerNorm inputs (x, x + attn), fp32 even under autocast
    norm_stats: int  # LayerNorm mean and 1/std, fp32
    linear_inputs: int  # what the four Linear layers save: their inputs
    attention: int  # q, k, v + logsumexp (SDPA) or softmax probabilities and causal mask (manual)
    mlp: int  # the GELU input
    dropout: int  # dropout masks (+ the dropped attention probabilities)
    weight_copies: int  # autocast: low-precision copies of the block's weight matrices

    @property
    def total(self) -> int:
        return (
            self.residual
            + self.norm_stats
            + self.linear_inputs
            + self.attention
            + self.mlp
            + self.dropout
            + self.weight_copies
        )

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("residual stream (LayerNorm inputs, fp32)", self.residual),
            ("LayerNorm statistics", self.norm_stats),
            ("Linear inputs", self.linear_inputs),
            ("attention (q, k, v + softmax state)", self.attention),
            ("GELU input", self.mlp),
            ("dropout masks", self.dropout),
            ("autocast weight copies", self.weight_copies),
        ]


def attention_path(cfg: Config, device_type: str = "cuda") -> str:
    """Which attention computation ``cfg`` runs in training on ``device_type``: 'fused', 'manual' or 'math'."""
    return attention.attention_path(cfg.attention, cfg.dropout, device_type)


def _sdpa_in_fp32(cfg: Config, device_type: str, seq_len: int) -> bool:
    # minilm.attention runs SDPA in fp32 on CPU under autocast where its bf16 CPU kernel is slower
    # (short sequences, small heads: attention.sdpa_in_fp32), casting q, k, v up and the output back down.
    autocast_cpu = cfg.attention == "sdpa" and device_type == "cpu" and cfg.precision != "fp32"
    return autocast_cpu and attention.sdpa_in_fp32(seq_len, cfg.d_model // cfg.n_heads, cfg.dropout)


def _element_bytes(cfg: Config) -> tuple[bool, int]:
    """(autocast?, bytes per activation element): 2 under bf16/fp16 autocast, else 4."""
    autocast = cfg.precision != "fp32"
    return autocast, 2 if autocast else 4


def _score_bytes(cfg: Config, device_type: str) -> tuple[int, int]:
    """(saved, backward-extra) bytes per element of the (b, a, s, s) attention probabilities."""
    autocast, e = _element_bytes(cfg)
    path = attention_path(cfg, device_type)
    if path == "fused":
        return 0, 0
    if path == "math":
        e_probs = e_grad = e_drop = mask = 4  # CPU math fallback: fp32 throughout, fp32 dropout mask
    elif autocast and device_type == "cuda":
        # CUDA autocast runs softmax in fp32 and casts its output back for the next matmul
        # (from PyTorch's autocast op lists; not measured here, there is no GPU in CI).
        e_probs, e_grad, e_drop, mask = 4 + 2, 4, 2, 1
    else:
        e_probs = e_grad = e_drop = e
        mask = 1 if device_type == "cuda" else e
    if cfg.dropout > 0:
        # probabilities + dropout mask + dropped probabilities; backward adds one gradient at a time
        return e_probs + mask + e_drop, e_grad
    # backward: the gradient w.r.t. the probabilities and w.r.t. the scores exist together
    return e_probs, 2 * e_grad


def _math_v_keeps_qkv(cfg: Config, batch_size: int) -> bool:
    # SDPA's math path reshapes v to (b·a, s, hd): a view when b or a is 1, else a copy. A view
    # of the fp32 qkv output keeps all of it (3·b·s·d) alive for backward.
    return not (cfg.bf16 or cfg.fp16) and (batch_size == 1 or cfg.n_heads == 1)


def layer_activations(cfg: Config, batch_size: int, seq_len: int, device_type: str = "cuda") -> LayerActivations:
    """Bytes saved for backward by one block at this batch and sequence length (see the module docstring)."""
    b, s, d, a, f = batch_size, seq_len, cfg.d_model, cfg.n_heads, cfg.ff_width
    autocast, e = _element_bytes(cfg)
    m = 1 if device_type == "cuda" else e  # CUDA's dropout keeps a bool mask; CPU's a mask in the input dtype
    bsd = b * s * d
    path = attention_path(cfg, device_type)
    saved_per_score, _ = _score_bytes(cfg, device_type)
    if path == "fused" and _sdpa_in_fp32(cfg, device_type, s):
        attention = 3 * 4 * bsd + 4 * bsd + 4 * a * b * s  # fp32 q, k, v and output (the proj gets a copy)
    elif path == "fused":
        attention = 3 * e * bsd + 4 * a * b * s  # q, k, v and the fp32 logsumexp per query
    elif path == "math":
        # fp32 copies of q (scaled), k (scaled) and v, or the whole qkv output when v is a view of it
        attention = (5 if _math_v_keeps_qkv(cfg, b) else 3) * 4 * bsd + saved_per_score * a * b * s * s
    else:
        attention = 3 * e * bsd + saved_per_score * a * b * s * s + s * s  # + the (s, s) bool causal mask
    return LayerActivations(
        residual=2 * 4 * bsd,
        norm_stats=2 * 2 * 4 * b * s,
        linear_inputs=e * b * s * (3 * d + f),
        attention=attention,
        mlp=e * b * s * f,
        dropout=2 * m * bsd if cfg.dropout > 0 else 0,  # after the attention projection and after the MLP
        weight_copies=2 * (4 * d * d + 2 * d * f) if autocast else 0,
    )


def block_forward_peak(cfg: Config, batch_size: int, seq_len: int, device_type: str = "cuda") -> int:
    """Bytes one block holds at its busiest moment of the forward pass, its input included.

    Inside attention: the tensors saved so far (input, ln_1, q/k/v, softmax state) plus
    temporaries that die when the attention returns — under autocast ln_1's fp32 output
    (4·b·s·d, the attention's argument); the qkv output when q, k, v are copies of it
    (3e·b·s·d); on the manual path the attention output before its heads are re-joined
    (e·b·s·d) and the masked scores, a local variable next to the probabilities
    (e·a·b·s²); on SDPA's CPU math path its fp32 (s, s) causal bias and output. Inside the
    MLP: everything the block saves, plus ln_2's fp32 output under autocast.
    """
    b, s, d, a = batch_size, seq_len, cfg.d_model, cfg.n_heads
    autocast, e = _element_bytes(cfg)
    bsd = b * s * d
    layer = layer_activations(cfg, b, s, device_type)
    saved_so_far = 4 * bsd + 2 * 4 * b * s + e * bsd + layer.attention + (2 * 4 * d * d if autocast else 0)
    temporaries = 4 * bsd if autocast else 0
    path = attention_path(cfg, device_type)
    if path == "fused" and _sdpa_in_fp32(cfg, device_type, s):
        temporaries += 3 * e * bsd
    elif path == "manual":
        temporaries += 3 * e * bsd + e * bsd + e * a * b * s * s
    elif path == "math":
        qkv = 3 * e * bsd if (autocast or not _math_v_keeps_qkv(cfg, b)) else 0
        unscaled = 2 * 4 * bsd if autocast else 0  # q.float(), k.float() before scaling
        temporaries += qkv + unscaled + 4 * bsd + 4 * s * s
    in_attention = saved_so_far + temporaries
    in_mlp = layer.total + (4 * bsd if autocast else 0)
    return max(in_attention, in_mlp)


def compiled_attention_backward_bytes(cfg: Config, batch_size: int, seq_len: int, device_type: str = "cuda") -> int:
    """Bytes attention's backward holds for a moment in a compiled CPU bf16 step, 0 where it does not run.

    A compiled step in bf16 on a CPU runs causal attention's backward as matmuls at short
    sequences (:class:`minilm.attention.CausalAttentionCPU`): at its fused elementwise kernel the
    fp32 scores S and their gradient dP are read while bf16 P and dS are written, 12 bytes per
    score, 12·a·b·s², plus the fp32 row sums of dY ⊙ Y (4·a·b·s). Small at 4 × 256: 24 MiB.
    """
    runs = (
        device_type == "cpu"
        and cfg.precision == "bf16"
        and cfg.attention == "sdpa"
        and attention.compiled_matmul_backward(seq_len, cfg.dropout, compiling=True)
    )
    a, b, s = cfg.n_heads, batch_size, seq_len
    return 12 * a * b * s * s + 4 * a * b * s if runs else 0


def block_backward_extra(
    cfg: Config, batch_size: int, seq_len: int, device_type: str = "cuda", compiled: bool = False
) -> int:
    """Bytes a block's backward pass holds on top of its saved activations, at its busiest.

    Two candidates. In the MLP, at GELU's backward, the gradients of GELU's output and
    input (2 × e·b·s·f) exist while the saved GELU output is already freed, and the
    output projection's weight gradient (4·d·f) has just been made: e·b·s·f + 4·d·f. In
    attention with materialised probabilities, the MLP's saved tensors are gone but the
    s² gradients appear, with the MLP's and projection's weight gradients. ``compiled``: a
    compiled step, where on a CPU in bf16 attention's backward holds s² tensors too
    (:func:`compiled_attention_backward_bytes`).
    """
    b, s, d, a, f = batch_size, seq_len, cfg.d_model, cfg.n_heads, cfg.ff_width
    _, e = _element_bytes(cfg)
    bsd = b * s * d
    mlp = e * b * s * f + 4 * d * f
    _, extra_per_score = _score_bytes(cfg, device_type)
    scores = extra_per_score * a * b * s * s
    if compiled:
        scores += compiled_attention_backward_bytes(cfg, b, s, device_type)
    if not scores:
        return mlp
    # Freed by then: GELU input and output, the fc and attention-projection inputs, ln_2's input.
    freed = 2 * e * b * s * f + 2 * e * bsd + 4 * bsd
    attention = scores + 4 * (2 * d * f + d * d) - freed
    return max(mlp, attention)


def chunked_loss_bytes(cfg: Config, tokens: int) -> dict[str, int]:
    """What :func:`minilm.loss.linear_cross_entropy` holds at its busiest, for ``tokens`` positions.

    At a chunk's gradient matmul: the final LayerNorm's output h (fp32, 4·N·d), under autocast
    its 16-bit head weight (2·V·d); the per-position targets, shares and mask (13·N); the two
    gradients it returns, d h (4·N·d) and d W (4·V·d, fp32); and one chunk of n positions: its
    fp32 logits turned probabilities (4·n·V), under autocast their 16-bit copy (2·n·V) and
    the 16-bit h chunk (2·n·d), three (n, 1) fp32 columns, and the matmul's output (e·n·d for
    d h; under autocast also e·V·d for d W, whichever is larger).
    """
    autocast = cfg.bf16 or cfg.fp16
    V, d, N = cfg.vocab_size, cfg.d_model, tokens
    n = min(chunk_rows(V), N)
    if autocast:
        chunk = 2 * n * d + 4 * n * V + 2 * n * V + 2 * max(n, V) * d
    else:
        chunk = 4 * n * V + 4 * n * d
    return {
        "final LayerNorm output": 4 * N * d,
        "head weight (16-bit copy)": 2 * V * d if autocast else 0,
        "loss bookkeeping": 13 * N + 4 + 3 * 4 * n + 4,
        "head gradients (dh, dW)": 4 * N * d + 4 * V * d,
        "one chunk of logits": chunk,
    }


def optimizer_temporaries(cfg: Config, impl: str = "foreach") -> int:
    """Peak scratch bytes inside ``AdamW.step()`` for ``cfg``'s fp32 parameters (:func:`adamw_temporaries`)."""
    groups = [
        [math.prod(shape) for _, shape in parameter_shapes(cfg) if (len(shape) >= 2) == is_matrix]
        for is_matrix in (True, False)  # AdamW's two groups, in named_parameters() order
    ]
    return adamw_temporaries(groups, impl)


def adamw_temporaries(groups: Sequence[Sequence[int]], impl: str = "foreach") -> int:
    """Peak scratch bytes inside ``AdamW.step()`` over fp32 ``groups`` (tensor sizes in elements, in step order).

    foreach: ``sqrt(exp_avg_sq)`` for a whole parameter group at once (4 bytes per parameter
    of the larger group: matrices, which get weight decay, or vectors). for-loop: one
    tensor at a time, ``sqrt`` and its division by the bias correction (2 tensors), while
    the previous tensor's result is still referenced. fused: none.
    """
    if impl == "fused":
        return 0
    if impl == "foreach":
        return 4 * max(sum(g) for g in groups)
    if impl != "for-loop":
        raise ValueError(f"optimizer must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    pairs = [(prev, cur) for g in groups for prev, cur in zip([0, *g[:-1]], g, strict=True)]
    return max((4 * (prev + 2 * cur) for prev, cur in pairs), default=0)


# Device types whose estimate is checked against measured steps (tests/test_memory.py, minilm.measure).
VALIDATED_DEVICE_TYPES = ("cuda", "cpu")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory of one config, in bytes, by component and by moment of the step."""

    batch_size: int  # micro-batch per device
    seq_len: int
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    device_type: str
    n_parameters: int
    parameters: int  # fp32 weights (autocast keeps them fp32: they are the master copy)
    gradients: int  # fp32, one per parameter
    optimizer_state: int  # AdamW exp_avg and exp_avg_sq, fp32
    optimizer_temporaries: int  # scratch inside optimizer.step()
    ddp_buckets: int  # DDP's gradient buckets (0 with one process or gradient_as_bucket_view=True)
    batch: int  # the int64 token ids and targets
    layer: LayerActivations  # one block, saved without checkpointing
    saved_activations: int  # all the forward pass leaves for backward, except the log-probs
    recompute: int  # checkpointing: one block's activations rebuilt during backward
    logits: int  # the fp32 log-probs cross-entropy saves (4·b·s·V); 0 with the chunked loss
    logits_transient: int  # the two extra fp32 b·s·V tensors early in backward; chunked loss: all it holds
    moments: dict[str, dict[str, int]] = field(default_factory=dict)  # moment -> component -> bytes
    workspaces: int = 0  # CUDA: cuBLAS workspaces held through the caching allocator (0 on CPU)

    @property
    def validated(self) -> bool:
        """False where no measurement has checked the estimate: Apple MPS (see VALIDATED_DEVICE_TYPES)."""
        return self.device_type in VALIDATED_DEVICE_TYPES

    @property
    def model_state(self) -> int:
        """Weights + gradients + optimizer state: 16 bytes per parameter with AdamW."""
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda k: sum(self.moments[k].values()))

    @property
    def peak_bytes(self) -> int:
        """The estimated peak: the largest moment (what ``torch.cuda.max_memory_allocated`` would report)."""
        return sum(self.moments[self.peak_moment].values())

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def at_peak(self) -> dict[str, int]:
        """What is alive at the peak, by component (sums to :attr:`peak_bytes`)."""
        return dict(self.moments[self.peak_moment])

    def table(self, fmt: str = "text") -> str:
        """The breakdown at the peak, then every candidate moment; ``fmt`` is 'text' or 'markdown'."""
        peak = self.peak_bytes
        title = (
            f"batch {self.batch_size} x seq {self.seq_len}, {self.precision}, "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, AdamW {self.optimizer}"
        )
        if not self.validated:
            title += f" (unvalidated on {self.device_type}: never measured there)"
        parts = [(name, n) for name, n in self.at_peak().items() if n]
        moments = [(name, sum(c.values())) for name, c in self.moments.items()]
        if fmt == "markdown":
            lines = [f"**{title}** — peak at *{self.peak_moment}*", ""]
            lines += ["| at the peak | MiB | share |", "|---|---:|---:|"]
            lines += [f"| {name} | {n / 2**20:,.1f} | {n / peak:.1%} |" for name, n in parts]
            lines += [f"| **total** | **{peak / 2**20:,.1f}** | |", "", "| moment of the step | MiB |", "|---|---:|"]
            lines += [f"| {name} | {n / 2**20:,.1f} |" for name, n in moments]
            return "\n".join(lines)
        if fmt != "text":
            raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
        w = max(len(name) for name, _ in parts + moments) + 2
        lines = [title, f"peak at: {self.peak_moment}", f"{'at the peak':<{w}}{'MiB':>12}{'share':>8}", "-" * (w + 20)]
        lines += [f"{name:<{w}}{n / 2**20:>12,.1f}{n / peak:>8.1%}" for name, n in parts]
        lines += ["-" * (w + 20), f"{'total':<{w}}{peak / 2**20:>12,.1f}", ""]
        lines += [f"{'moment of the step':<{w}}{'MiB':>12}"]
        lines += [f"{name:<{w}}{n / 2**20:>12,.1f}" + ("  <- peak" if n == peak else "") for name, n in moments]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def estimate_training_memory(
    cfg: Config,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    optimizer: str = "fused",
    device_type: str = "cuda",
    gradient_as_bucket_view: bool = False,
    keep_logits: bool = False,
    chunked_loss: bool = False,
    compiled: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one training step of ``GPT(cfg)`` on one device, as a :class:`MemoryEstimate`.

    ``batch_size`` / ``seq_len`` default to ``cfg.batch_size`` / ``cfg.max_seq_len``.
    Precision, checkpointing, attention kernel, dropout, accumulation and ``world_size``
    (DDP buckets) come from ``cfg``. ``optimizer`` is AdamW's implementation: 'fused' (what
    minilm's trainer uses), 'foreach' (PyTorch's default on GPU) or 'for-loop' (its default
    on CPU). ``keep_logits=True`` counts the logits as held through backward, as a loop
    that writes ``logits, loss = model(x, y)`` does (e·b·s·V bytes more).
    ``chunked_loss=True`` is the trainer's loss, ``model(x, y, return_logits=False)``
    (:mod:`minilm.loss`): no (b, s, V) tensor, one chunk of logits at a time.
    ``compiled=True``: the step runs under ``torch.compile``. The estimate still counts the
    eager step's tensors (inductor's buffer reuse is not modelled), plus what only the compiled
    step holds: on a CPU in bf16 at short sequences, attention's backward working set
    (:func:`compiled_attention_backward_bytes`). Against the compiled CPU step, measured by the
    CPU allocator's records (``measure_training_step(..., compiled=True)``), it was within 10%
    on 15 of the 16 grid cases of the d128 validation shape (−7.1% to +9.6%) and 15.5% high on
    one (batch 4 × 64, bf16): in bf16 it mostly errs high, where inductor reuses buffers (the safe
    side for a memory check); in fp32 the compiled forward held up to 7.1% more than estimated.
    ``tests/test_memory.py`` checks four cases, never more than 10% low nor 20% high.
    ``device_type`` ('cuda' or 'cpu') selects the few kernel differences (dropout mask
    dtype, SDPA's fallback on CPU, softmax precision under autocast). 'mps' (Apple GPUs) is
    accepted and computed like 'cuda', but unvalidated: ``.validated`` is False and the table says so.
    """
    if optimizer not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_IMPLS}, got {optimizer!r}")
    if device_type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device_type must be 'cuda', 'cpu' or 'mps', got {device_type!r}")
    if keep_logits and chunked_loss:
        raise ValueError("keep_logits=True holds the full logits; chunked_loss=True never builds them: choose one")
    estimated_for = device_type
    # Apple MPS: never measured (no Mac was available), so it borrows CUDA's kernel assumptions and the
    # estimate says it is unvalidated (MemoryEstimate.validated).
    device_type = "cuda" if device_type == "mps" else device_type
    b = batch_size or cfg.batch_size
    s = seq_len or cfg.max_seq_len
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    autocast, e = _element_bytes(cfg)

    pc = count_parameters(cfg)
    N = pc.total
    params, grads, adam = 4 * N, 4 * N, 8 * N
    opt_tmp = optimizer_temporaries(cfg, optimizer)
    ddp = 4 * N if (cfg.world_size > 1 and not gradient_as_bucket_view) else 0
    batch = 2 * 8 * b * s + 8 * s  # int64 ids and targets, plus the position index

    layer = layer_activations(cfg, b, s, device_type)
    bsd = b * s * d
    kept_per_layer = 4 * bsd if cfg.gradient_checkpointing else layer.total  # checkpointing keeps the fp32 input
    # The embedding's dropout acts on fp32 (embeddings are not autocast): a bool mask on CUDA, fp32 on CPU.
    embedding_dropout = (1 if device_type == "cuda" else 4) * bsd if cfg.dropout > 0 else 0
    # After the blocks: ln_f's fp32 input and stats, the head's input, autocast's copy of the head weight.
    final = 4 * bsd + 2 * 4 * b * s + e * bsd + (2 * V * d if autocast else 0)
    if chunked_loss:  # the chunked loss saves nothing of its own (its gradients are counted apart)
        final = 4 * bsd + 2 * 4 * b * s
    saved = L * kept_per_layer + embedding_dropout + final
    # Checkpointing rebuilds one block in backward; its input is the kept tensor, not a new one.
    recompute = layer.total - 4 * bsd if cfg.gradient_checkpointing else 0
    bsV = b * s * V
    log_probs, ce_transient = 4 * bsV, 2 * 4 * bsV
    block_tmp = block_backward_extra(cfg, b, s, device_type, compiled)
    in_flight = 4 * bsd  # the fp32 gradient of the residual stream

    accumulating = cfg.grad_accumulation_steps > 1  # from micro-batch 2 on, gradients exist all step
    workspaces = cublas_workspace_bytes() if device_type == "cuda" else 0
    state = {"parameters": params, "optimizer state": adam, "DDP buckets": ddp, "batch": batch}
    if workspaces:
        state["cuBLAS workspaces"] = workspaces
    if accumulating:
        state["gradients (previous micro-batches)"] = grads
    head_grad = 4 * V * d  # the LM head's (or the tied embedding's) gradient, made first in backward
    per_layer_grads = 4 * pc.per_layer
    tied = cfg.tie_embeddings

    moments: dict[str, dict[str, int]] = {}
    # autocast caches its weight casts until the autocast region exits (after the loss): with
    # checkpointing nothing else holds them, but until then every block's copies are alive.
    weight_cache = L * layer.weight_copies if cfg.gradient_checkpointing else 0
    if chunked_loss:
        loss_parts = chunked_loss_bytes(cfg, b * s)
        log_probs, ce_transient = 0, sum(loss_parts.values())
        # Its busiest moment is in the forward call; later moments count dW and dh as gradients.
        moments["chunked loss"] = {**state, "saved activations": saved, "autocast weight cache": weight_cache}
        moments["chunked loss"].update(loss_parts)
    else:
        moments["forward end"] = {
            **state,
            "saved activations": saved,
            "autocast weight cache": weight_cache,
            # logits (e bytes), their fp32 copy under autocast, and the fp32 log-probs being written
            "logits": bsV * (e + (4 if autocast else 0) + 4),
        }
        moments["loss backward"] = {
            **state,
            "saved activations": saved,
            "logits (log-probs)": log_probs,
            "logits (backward transients)": ce_transient,
        }
    first_grads = 0 if accumulating else head_grad + 4 * pc.final_norm + (L - 1) * per_layer_grads
    block_fwd = block_forward_peak(cfg, b, s, device_type)
    if cfg.gradient_checkpointing:
        # The last block is rebuilt first in backward, next to the head's gradient.
        moments["last block recompute"] = {
            **state,
            "saved activations": (L - 1) * kept_per_layer + embedding_dropout,
            "recomputed block": block_fwd,
            "gradients so far": head_grad,
            "gradient in flight": in_flight,
        }
    else:
        moments["last block forward"] = {
            **state,
            "saved activations": (L - 1) * kept_per_layer + embedding_dropout,
            "block being computed": block_fwd,
        }
    moments["last block backward"] = {
        **state,
        "saved activations": L * kept_per_layer + embedding_dropout,
        "recomputed block": recompute,
        "gradients so far": head_grad,
        "gradient in flight": in_flight,
        "backward temporaries": block_tmp,
    }
    moments["first block backward"] = {
        **state,
        "saved activations": kept_per_layer + embedding_dropout,
        "recomputed block": recompute,
        "gradients so far": first_grads if not accumulating else head_grad,
        "gradient in flight": in_flight,
        "backward temporaries": block_tmp,
    }
    # Embedding backward: a tied weight's gradient arrives twice (head, embedding) and the two
    # V·d tensors are added out of place; an untied embedding's gradient is simply kept.
    if accumulating:
        emb_new = (3 if tied else 1) * 4 * V * d
    else:
        emb_new = grads + (2 * 4 * V * d if tied else 0)
    moments["embedding backward"] = {**state, "gradients so far": emb_new, "gradient in flight": in_flight}
    if keep_logits:
        # A variable holding the logits keeps them through backward (and, when accumulating,
        # into the next micro-batch's forward, until it is reassigned).
        held = {"logits (held by the caller)": e * bsV}
        for name in moments:
            if "backward" in name or "recompute" in name or accumulating:
                moments[name] = {**moments[name], **held}
    moments["optimizer step"] = {
        "parameters": params,
        "optimizer state": adam,
        "DDP buckets": ddp,
        "batch": batch,
        "gradients": grads,
        "optimizer temporaries": opt_tmp,
        **({"cuBLAS workspaces": workspaces} if workspaces else {}),
    }
    return MemoryEstimate(
        batch_size=b,
        seq_len=s,
        precision=cfg.precision_label,
        gradient_checkpointing=cfg.gradient_checkpointing,
        optimizer=optimizer,
        device_type=estimated_for,
        n_parameters=N,
        parameters=params,
        gradients=grads,
        optimizer_state=adam,
        optimizer_temporaries=opt_tmp,
        ddp_buckets=ddp,
        batch=batch,
        layer=layer,
        saved_activations=saved,
        recompute=recompute,
        logits=log_probs,
        logits_transient=ce_transient,
        moments=moments,
        workspaces=workspaces,
    )


def trainer_step_memory(cfg: Config, **kwargs) -> MemoryEstimate:
    """The memory of one step as minilm's trainer runs it: :func:`estimate_training_memory`
    with the trainer's chunked loss (``chunked_loss=True``, :mod:`minilm.loss`; no (b, s, V)
    logits) and fused AdamW.

    Every tool that predicts a minilm training run (the planner in :mod:`minilm.sizing`, the
    per-GPU estimates of :mod:`minilm.sharding`, the config editor, the trainer's memory check)
    uses this rule; ``estimate_training_memory`` itself keeps the full logits of a plain
    ``loss = model(x, y)`` loop as its default (the memory lesson's formula). ``kwargs`` are
    ``estimate_training_memory``'s other arguments (``batch_size``, ``seq_len``,
    ``device_type``, ...). Bytes, per device.
    """
    if kwargs.get("keep_logits") or kwargs.get("chunked_loss") is False:
        raise ValueError("trainer_step_memory is the chunked loss; call estimate_training_memory for full logits")
    return estimate_training_memory(cfg, **{**kwargs, "chunked_loss": True})
