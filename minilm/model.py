"""The GPT model: token + position embeddings, a stack of blocks, a final norm, an LM head.

>>> from minilm import Config, GPT
>>> model = GPT(Config(vocab_size=65, d_model=64, n_heads=4, n_layers=2, max_seq_len=128))
>>> logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
>>> _, loss = model(idx, targets, return_logits=False)   # training: the loss alone, no (B, T, V) logits
>>> out = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=40)  # see minilm.generation
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilm import aten_ops
from minilm.attention import KVCache
from minilm.blocks import Block
from minilm.config import Config
from minilm.loss import linear_cross_entropy


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # token embedding (V, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # learned positions (P, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = aten_ops.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One tensor, two uses: the head reads the embedding's weight (not a copy).
            self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by
        # 1/sqrt(2·n_layers), so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied weight counts once); optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), mean cross-entropy.

        ``cache`` (generation, see :mod:`minilm.generation`): one :class:`KVCache` per block,
        holding the earlier positions' keys and values; idx then holds only the new tokens,
        which sit at positions ``len(cache[0])`` onwards, and the cache grows by T.
        ``return_logits=False`` (with targets) returns ``(None, loss)``: the loss is computed a
        chunk of positions at a time (:func:`minilm.loss.linear_cross_entropy`), so the (B, T, V)
        logits never exist. Same loss and gradients, less memory, faster; the trainer uses it.
        """
        B, T = idx.shape
        past = len(cache[0]) if cache else 0  # positions already in the cache
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block's input; recompute its insides during backward.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache[i] if cache else None)
        x = self.ln_f(x)  # (B, T, C)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + n).

        ``temperature=0`` is greedy decoding. See :func:`minilm.generation.generate`.
        """
        from minilm.generation import generate  # generation builds on the model: import at call time

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache)
