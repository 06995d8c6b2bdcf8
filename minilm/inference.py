"""Inference cost in closed form: KV-cache bytes and the FLOPs of generating one token, with and without the cache.

    >>> from minilm import load_config
    >>> from minilm.inference import kv_cache_bytes_per_token, kv_cache_bytes, generation_flops
    >>> kv_cache_bytes_per_token(load_config("small"))              # bytes per token of context, bf16
    16384
    >>> kv_cache_bytes(load_config("small"), context_len=1024, batch_size=8)
    >>> generation_flops(cfg, context_len=512, use_cache=True)     # FLOPs of the 512th token

With d = d_model, L = layers and e = bytes per element, every layer keeps one key and one
value vector of d numbers per position: the cache holds **2 · L · d · e bytes per token of
context**, for each sequence of the batch (it does not depend on the number of heads, nor
on the vocabulary).

FLOPs follow :mod:`minilm.flops` (a multiply-add is 2 FLOPs, matmuls only, no discount for
the causal mask). With N_mm the weights that multiply activations (LM head included), the
forward pass that produces the token at context length n (the n-th position attends to n
positions, itself included) costs

- with the cache: the new token only, ``2 · N_mm + 4 · L · n · d``;
- without: the whole context again, ``n · (2 · N_mm + 4 · L · n · d)`` (the model computes
  every position's logits, as ``GPT.forward`` does), n times more and growing as n².
"""

from __future__ import annotations

from minilm.config import Config
from minilm.flops import flop_breakdown


def kv_cache_bytes_per_token(cfg: Config, bytes_per_element: int = 2) -> int:
    """Bytes the KV cache holds per token of context per sequence: 2 · n_layers · d_model · bytes_per_element.

    ``bytes_per_element``: 2 for bf16/fp16 (the usual inference precision), 4 for fp32.
    """
    return 2 * cfg.n_layers * cfg.d_model * bytes_per_element


def kv_cache_bytes(cfg: Config, context_len: int | None = None, batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of a full KV cache: ``batch_size`` sequences of ``context_len`` tokens (default ``max_seq_len``)."""
    n = cfg.max_seq_len if context_len is None else context_len
    return batch_size * n * kv_cache_bytes_per_token(cfg, bytes_per_element)


def generation_flops(cfg: Config, context_len: int, use_cache: bool = True) -> int:
    """Forward FLOPs to produce the next token once the context holds ``context_len`` positions (new one included).

    With the cache: one position, 2·N_mm + 4·L·n·d. Without: all n positions, n · (2·N_mm + 4·L·n·d).
    """
    if not 1 <= context_len <= cfg.max_seq_len:
        raise ValueError(f"context_len must be in 1..max_seq_len={cfg.max_seq_len}, got {context_len}")
    n, L, d = context_len, cfg.n_layers, cfg.d_model
    one_position = 2 * flop_breakdown(cfg).matmul_parameters + 4 * L * n * d
    return one_position if use_cache else n * one_position


def generation_flops_total(cfg: Config, prompt_len: int, new_tokens: int, use_cache: bool = True) -> int:
    """Forward FLOPs to generate ``new_tokens`` after a ``prompt_len``-token prompt (within ``max_seq_len``).

    With the cache the first step processes the whole prompt (its n positions attend to 1..n
    positions: counted as n · (2·N_mm + 4·L·n·d), like an uncached step); later steps one token each.
    """
    if prompt_len < 1 or prompt_len + new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(
            f"prompt_len + new_tokens - 1 must be in 1..max_seq_len={cfg.max_seq_len}, "
            f"got {prompt_len} + {new_tokens} - 1"
        )
    total = 0
    for step in range(new_tokens):
        n = prompt_len + step  # positions the forward pass ends at
        total += generation_flops(cfg, n, use_cache=use_cache and step > 0)
    return total
