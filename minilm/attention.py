"""Causal multi-head self-attention, twice: a readable einops version and the fused kernel.

Both paths share the same Q/K/V and output projections, so they are interchangeable on
the same weights (``tests/test_attention.py`` checks forward and gradients agree).

Shapes: B batch, T sequence length, C = d_model, H heads, D = C // H head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minilm import aten_ops

# Sequence length x head size² at and above which PyTorch's CPU attention kernel (torch 2.13)
# runs faster in bf16 than in fp32 with the casts around it. Measured forward + backward on an
# AVX512-BF16 + AMX CPU, one thread (time in bf16 / time in fp32): head size 64: T=128 1.82,
# T=256 0.84, T=1024 0.68; head size 32: T=256 1.47, T=512 1.22, T=1024 0.90.
SDPA_BF16_MIN_T_D2 = 256 * 64**2


def sdpa_in_fp32(seq_len: int, head_dim: int, dropout_p: float = 0.0) -> bool:
    """Whether the CPU attention kernel runs in fp32 under bf16 autocast: below the threshold, where
    fp32 is faster, and with dropout (SDPA then has no fused CPU kernel, only its math fallback).
    :class:`CausalSelfAttention` follows this rule, and so does the memory estimate."""
    return dropout_p > 0 or seq_len * head_dim**2 < SDPA_BF16_MIN_T_D2


# Sequence lengths up to which a *compiled* CPU step in bf16 runs attention's backward as five
# batched matmuls (:class:`CausalAttentionCPU`) instead of PyTorch's fused CPU backward kernel.
# Measured backward per layer on its own, compiled, one thread, AVX512-BF16 + AMX, torch 2.13, bf16,
# batch 4, 8 heads of 64 (fused kernel -> matmuls): T=128 9.6 -> 4.5 ms, T=256 14.0 -> 14.1 ms; but
# T=512 38 -> 73 ms and T=1024 43 -> 156 ms (at batch 2): the (T, T) tensors outgrow the caches, and
# the fused kernel skips the masked half. Inside the whole compiled small step at 4 x 256, where
# inductor fuses its elementwise work with its neighbours', the step ran 7% faster than with the
# fused backward (two pairs of alternating processes), and 3% faster than with the fused fp32
# backward on fp32 copies of q, k, v.
COMPILED_MATMUL_BACKWARD_MAX_T = 256


def compiled_matmul_backward(seq_len: int, dropout_p: float = 0.0, compiling: bool | None = None) -> bool:
    """Whether causal attention on a CPU under bf16 autocast runs :class:`CausalAttentionCPU`.

    Only inside ``torch.compile`` (``compiling``: default, ask torch): there inductor fuses the
    elementwise work between the backward's matmuls into one loop; run eagerly, as separate
    operators, the same backward is ~2.7x slower than the fused kernel. Not with dropout (the
    fused kernel has none on CPU either) and only up to :data:`COMPILED_MATMUL_BACKWARD_MAX_T`.
    The memory estimate asks this too (``minilm.memory``, ``compiled=True``).
    """
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    return compiling and dropout_p == 0 and seq_len <= COMPILED_MATMUL_BACKWARD_MAX_T


class CausalAttentionCPU(torch.autograd.Function):
    """Causal attention: PyTorch's fused CPU kernel forward, its backward written out as matmuls.

    Forward: ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel SDPA itself calls
    on a CPU, which also returns each query's logsumexp L_i = log Σ_j exp(s_ij). Backward, with
    FlashAttention-2's numerics (``tests/test_attention.py`` compares it with the fused backward
    and with fp64): the scores S = q kᵀ and dP = dY vᵀ recomputed in fp32 from the bf16 inputs,
    P = exp(S/√D − L) (the forward's probabilities, no second softmax), and P and dS rounded to
    bf16 only where they enter the last three matmuls. It holds four (B, H, T, T) tensors for a
    moment, 12 bytes per score (``minilm.memory.compiled_attention_backward_bytes``).
    q, k, v: (B, H, T, D) bf16 -> (B, H, T, D) bf16.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v arrive as head-major views of the (B, T, 3C) projection. Contiguous copies (one fused
        # pass, the same bytes kept for backward) spare the backward's matmuls a copy each: 2% of the
        # compiled small step (in-process A/B runs: 0.980, 0.979).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        y, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, y, lse)  # what SDPA's own backward keeps: no (T, T) tensor
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, y, lse = ctx.saved_tensors  # lse: (B, H, T) fp32
        T, scale = q.shape[-2], q.shape[-1] ** -0.5
        # Measured no faster in the compiled small step (in-process A/B, 14 steps): dP before P, which lets
        # inductor compute P and dS in one loop without writing P in fp32 (1.005 of the time), and the
        # queries in two causal blocks, a quarter fewer scores (1.005).
        # Eagerly a backward runs without autocast; traced by torch.compile it ran under the forward's,
        # which made the fp32 score matmuls bf16 ones (scores rounded to bf16). The precisions are set here.
        with torch.autocast(q.device.type, enabled=False):
            # fp32 products of bf16 values, on the bf16 units (aten_ops.matmul_nt_of_bf16_values). dY is
            # a head-major view of (B, T, H, D) rows: made contiguous in the same pass as its fp32 copy,
            # so that the matmul needs no second copy (2% of the compiled small step, with q, k, v's).
            s = aten_ops.matmul_nt_of_bf16_values(_fp32(q), _fp32(k))  # (B, H, T, T) fp32: q kᵀ
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            p = torch.exp(s * scale - lse.unsqueeze(-1)).masked_fill(future, 0.0)  # the forward's softmax
            dp = aten_ops.matmul_nt_of_bf16_values(_fp32(dy), _fp32(v))  # (B, H, T, T) fp32: dY vᵀ
            # Softmax backward: dS = P ⊙ (dP − Σ_j P_ij dP_ij), and that row sum equals Σ_d dY ⊙ Y.
            ds = (p * (dp - (dy.float() * y.float()).sum(-1, keepdim=True)) * scale).to(q.dtype)
            dq = ds @ k  # (B, H, T, D)
            dk = ds.transpose(-1, -2) @ q
            dv = p.to(v.dtype).transpose(-1, -2) @ dy
        return dq, dk, dv


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """softmax(q kᵀ / √D + causal mask) v, written out step by step.

    q, k, v: (B, H, T, D) -> (B, H, T, D). ``dropout`` acts on the attention weights.
    With a KV cache, k and v hold S >= T positions: the queries are the last T of them.
    """
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)  # (B, H, T, S)
    # Query i sits at position S - T + i and may look at positions j <= S - T + i only.
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=1 + S - T)
    scores = scores.masked_fill(future, float("-inf"))
    weights = dropout(torch.softmax(scores, dim=-1))  # (B, H, T, S), rows sum to 1
    return torch.einsum("bhij,bhjd->bhid", weights, v)  # (B, H, T, D)


class KVCache:
    """One attention layer's keys and values of the positions already processed (generation only).

    A causal model's keys and values at a position never change once computed: later tokens
    cannot influence them. So generation keeps them and feeds only the new token, whose query
    attends to every cached key, instead of recomputing the whole context for each token.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, H, positions so far, D)
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        """Positions held so far."""
        return 0 if self.k is None else self.k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' k, v (B, H, T, D); returns the keys and values of all positions so far."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)
        self.k, self.v = k, v
        return k, v


def attention_path(impl: str, dropout: float, device_type: str) -> str:
    """Which attention computation runs in training: 'fused', 'manual' or 'math'.

    'fused' is SDPA's flash / memory-efficient kernel (keeps no T² tensor). On CPU, SDPA
    with dropout > 0 has no fused kernel and falls back to 'math', which materialises the
    (B, H, T, T) probabilities like the manual path. The memory estimate and the FLOP count
    ask this function, so they follow the kernel the model runs.
    """
    if impl == "manual":
        return "manual"
    return "math" if (dropout > 0 and device_type == "cpu") else "fused"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection (GPT-2 layout).

    ``impl='manual'`` runs :func:`manual_attention`; ``impl='sdpa'`` runs
    ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where available). Parameters: QKV 3C² + 3C, output C² + C (biases if ``bias``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        if impl not in ("sdpa", "manual"):
            raise ValueError(f"impl must be 'sdpa' or 'manual', got {impl!r}")
        self.n_heads = n_heads
        self.impl = impl
        self.dropout_p = dropout
        self.qkv = aten_ops.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = aten_ops.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:  # x: (B, T, C)
        # Split the fused projection into q, k, v (B, T, C) each, then each into heads (B, H, T, D).
        # (Splitting before the head reshape, as nanoGPT does, lets backward write the three
        # gradients straight back into one (B, T, 3C) tensor; one (3, B, H, T, D) rearrange
        # cost an extra copy of it per layer.)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        mask = None  # None: plain causal attention over these T positions
        if cache is not None:
            past = len(cache)
            k, v = cache.append(k, v)  # (B, H, S, D): the cached positions, then these T
            if past > 0:  # the queries are the last T of S positions: query i sees keys j <= past + i
                T, S = q.shape[-2], k.shape[-2]
                mask = ~torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=1 + past)  # True: may attend
        if self.impl == "sdpa":
            p = self.dropout_p if self.training else 0.0
            cpu_autocast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            if cpu_autocast and mask is None and q.dtype == torch.bfloat16 and compiled_matmul_backward(q.shape[-2], p):
                y = CausalAttentionCPU.apply(q, k, v)  # compiled, short sequences: see the class
            elif cpu_autocast and sdpa_in_fp32(q.shape[-2], q.shape[-1], p):
                # PyTorch's CPU attention kernel is slower in bf16 than in fp32 at short sequences
                # (see sdpa_in_fp32): there run it in fp32. The projections around it stay in bf16.
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=p, is_causal=mask is None
                    )
                y = y.to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        else:
            y = manual_attention(q, k, v, self.attn_dropout)
        y = rearrange(y, "b h t d -> b t (h d)")  # re-join heads: (B, T, C)
        return self.resid_dropout(self.proj(y))
