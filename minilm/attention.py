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

# On a CPU under bf16 autocast the fastest way to attend depends on the sequence length T and
# the head size D. Measured forward + backward on an AVX512-BF16 + AMX CPU, one thread, torch 2.13,
# 4,096 tokens, d_model 512 (time of the written-out attention in bf16 / the faster SDPA kernel):
# D=16: T=64 0.75, T=128 2.10; D=32: T=128 0.86, T=256 1.68; D=64: T=256 0.74, T=512 1.55;
# D=128: T=512 0.80, T=1024 2.37. Up to T = 4·D the (T, T) scores are small enough that two bf16
# matmuls around a softmax beat SDPA's CPU kernel, which works in blocks; beyond, the kernel wins.
MANUAL_MAX_T_PER_D = 4
# Beyond that, SDPA's kernel in bf16 beats it in fp32 (with the casts around it) from this
# sequence length x head size² on (bf16 / fp32: head size 64: T=256 0.84, T=1024 0.68; head
# size 32: T=256 1.47, T=512 1.22, T=1024 0.90).
SDPA_BF16_MIN_T_D2 = 256 * 64**2


def cpu_autocast_kernel(seq_len: int, head_dim: int, dropout_p: float = 0.0) -> str:
    """What ``impl='sdpa'`` runs on a CPU under bf16 autocast: 'manual', 'sdpa-fp32' or 'sdpa-bf16'.

    'manual' is :func:`manual_attention` in bf16; 'sdpa-fp32' is SDPA on q, k, v cast up to fp32.
    With dropout SDPA has no fused CPU kernel, only its math fallback, which stays in fp32.
    :class:`CausalSelfAttention` follows this rule, and so do the memory estimate and the FLOP count.
    """
    if dropout_p > 0:
        return "sdpa-fp32"
    if seq_len <= MANUAL_MAX_T_PER_D * head_dim:
        return "manual"
    return "sdpa-fp32" if seq_len * head_dim**2 < SDPA_BF16_MIN_T_D2 else "sdpa-bf16"


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


def attention_path(
    impl: str, dropout: float, device_type: str, seq_len: int = 0, head_dim: int = 1, cpu_autocast: bool = False
) -> str:
    """Which attention computation runs in training: 'fused', 'manual' or 'math'.

    'fused' is SDPA's flash / memory-efficient kernel (keeps no T² tensor). On CPU, SDPA
    with dropout > 0 has no fused kernel and falls back to 'math', which materialises the
    (B, H, T, T) probabilities like the manual path; under bf16 autocast at short sequences
    (``seq_len``, ``head_dim``: :func:`cpu_autocast_kernel`) 'sdpa' runs the manual path. The
    memory estimate and the FLOP count ask this function, so they follow the kernel the model runs.
    """
    if impl == "manual":
        return "manual"
    if device_type == "cpu" and cpu_autocast and cpu_autocast_kernel(seq_len, head_dim, dropout) == "manual":
        return "manual"
    return "math" if (dropout > 0 and device_type == "cpu") else "fused"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection (GPT-2 layout).

    ``impl='manual'`` runs :func:`manual_attention`; ``impl='sdpa'`` runs
    ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where available), except on a CPU under bf16 autocast, where it runs whichever of the two
    is faster at this shape (:func:`cpu_autocast_kernel`). Parameters: QKV 3C² + 3C, output C² + C (biases if ``bias``).
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
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
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
        p = self.dropout_p if self.training else 0.0
        kernel = "manual" if self.impl == "manual" else "sdpa"
        if kernel == "sdpa" and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            kernel = cpu_autocast_kernel(q.shape[-2], q.shape[-1], p)  # the fastest on a CPU (see there)
            if kernel == "manual" and cache is not None:
                kernel = "sdpa-fp32"  # generation: the rule was measured on training steps only
        if kernel == "manual":
            y = manual_attention(q, k, v, self.attn_dropout)
        elif kernel == "sdpa-fp32":
            # The projections around it stay in bf16; only the kernel runs in fp32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=p, is_causal=mask is None
                )
            y = y.to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        y = rearrange(y, "b h t d -> b t (h d)")  # re-join heads: (B, T, C)
        return self.resid_dropout(self.proj(y))
