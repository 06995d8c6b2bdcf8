"""Text generation: turn next-token logits into tokens (greedy, temperature, top-k, top-p), with a KV cache.

    >>> from minilm.generation import generate, generate_text, next_token_probs
    >>> out = generate(model, idx, max_new_tokens=50, temperature=0.8, top_p=0.9)  # idx (B, T) -> (B, T + 50)
    >>> generate(model, idx, 50, temperature=0) .equal(generate(model, idx, 50, temperature=0, use_cache=False))
    True
    >>> probs = next_token_probs(logits[:, -1], temperature=0.8, top_k=40)  # (B, V): what sampling draws from
    >>> generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200, top_p=0.9)[0]

One step of sampling, in order (:func:`next_token_probs`):

1. divide the logits by ``temperature`` (below 1 sharpens the distribution, above 1 flattens
   it; 0 means greedy: take the argmax and skip the rest);
2. ``top_k``: keep the k likeliest tokens;
3. ``top_p`` (nucleus sampling, Holtzman et al. 2019): keep the smallest set of the likeliest
   tokens whose probabilities add up to at least p;
4. softmax over what is kept, and draw one token.

The KV cache (:class:`minilm.attention.KVCache`, one per block): the first step runs the
whole prompt and stores every layer's keys and values; each later step feeds only the one
new token, whose query attends to the stored keys. A step then costs one token's forward
pass instead of the whole context's (:mod:`minilm.inference` counts the FLOPs and bytes), and
the output is the same as recomputing everything (``tests/test_generation.py`` checks greedy
decoding token for token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from minilm.attention import KVCache

if TYPE_CHECKING:
    from minilm.model import GPT


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., V) with all but the k largest set to -inf (ties with the k-th are kept)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    kth = torch.topk(logits, min(k, logits.size(-1))).values[..., -1:]  # the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (..., V) keeping exactly the smallest set of likeliest tokens whose probability reaches ``p``.

    Sort the probabilities in descending order; a token is kept when the tokens ranked above it
    add up to less than p (so it is still needed to reach p). The likeliest token is always kept.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1:
        return logits  # everything: spare the rounding of a cumulative sum that should end at exactly 1
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # p already reached without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (B, V) that sampling draws the next token from, given the last position's logits (B, V).

    ``temperature=0`` (greedy) puts probability 1 on the argmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return F.softmax(logits, dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One next token id per row (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy: no randomness, no filtering
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled tokens to idx (B, T) token ids; returns (B, T + n).

    ``use_cache``: keep every layer's keys and values (a KV cache) and feed only the new token
    each step. Once the text is longer than ``max_seq_len``, the model sees only the last
    ``max_seq_len`` tokens; each of them then moves to a new position every step, so their
    cached keys no longer apply and the window is recomputed, as without the cache. Stops
    early when every row has produced ``eos_id``. The model runs in eval mode (no dropout).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    window = model.cfg.max_seq_len
    cache = [KVCache() for _ in model.blocks] if use_cache else None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= window:
            logits, _ = model(idx[:, len(cache[0]) :], cache=cache)  # only the tokens not yet cached
        else:
            logits, _ = model(idx[:, -window:])  # the whole (cropped) context, recomputed
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # last position predicts
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None:
            done |= next_id.squeeze(1) == eos_id
            if bool(done.all()):
                break
    model.train(was_training)
    return idx


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
    top_p: float | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Continue ``prompt`` (text or token ids) ``num_samples`` times; returns the decoded texts.

    The model may have more output ids than the tokenizer has tokens (``vocab_size`` is
    rounded up, or BPE ran out of merges): those ids never occur in the data, so a
    forward hook masks their logits to -inf and :func:`generate` can never pick one.
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
        out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator=generator, use_cache=use_cache)
    finally:
        if handle is not None:
            handle.remove()
    return [tokenizer.decode(row) for row in out.tolist()]
