"""The transformer block: pre-LayerNorm attention and MLP, each on a residual branch."""

from __future__ import annotations

import torch
from torch import nn

from minilm import aten_ops
from minilm.attention import CausalSelfAttention, KVCache
from minilm.config import Config


class MLP(nn.Module):
    """Position-wise feed-forward: C -> d_ff -> C with GELU. Parameters 2·C·d_ff + d_ff + C."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        self.fc = aten_ops.Linear(d_model, d_ff, bias=bias)
        # GPT-2 used the tanh approximation ("gelu_new"); exact GELU is the modern default.
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.proj = aten_ops.Linear(d_ff, d_model, bias=bias, onednn_fp32=True)  # see aten_ops.fp32_linear
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = self.fc(x)  # (B, T, d_ff)
        if aten_ops.use_aten_ops(h) and self.act.approximate == "none":
            h = aten_ops.gelu(h)  # compiled on a CPU: ATen's GELU kernels beat inductor's (minilm.aten_ops)
        else:
            h = self.act(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)). Parameters 4C² + 2·C·d_ff + d_ff + 9C with biases."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = aten_ops.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias, cfg.attention)
        self.ln_2 = aten_ops.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_width, cfg.dropout, cfg.bias, cfg.activation)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x
