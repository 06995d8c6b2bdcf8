"""What the lessons build by hand equals what the library computes.

Lesson 3 (notebooks/03_building_the_gpt.ipynb) writes a GPT from a dictionary of tensors;
the reference below is that model, kept here so that a change to ``minilm.GPT`` that changes
its function (a post-LN block, an untied head that stays tied, a missing 1/sqrt(D), a wrong
init scale) fails a unit test and not only a notebook. Lesson 1 trains BPE by hand on a toy
text; the by-hand merges below must be the library's.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from minilm import GPT, Config
from minilm.tokenizer import BPETokenizer


# ---------------------------------------------------------------------------------------
# A GPT by hand (lesson 3), from a state dict with minilm.GPT's names
# ---------------------------------------------------------------------------------------
def _linear(p: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    y = x @ p[name + ".weight"].T  # weights stored (out, in), as nn.Linear stores them
    return y + p[name + ".bias"] if name + ".bias" in p else y


def _layer_norm(p: dict[str, torch.Tensor], x: torch.Tensor, name: str, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    y = (x - mean) / torch.sqrt(var + eps) * p[name + ".weight"]
    return y + p[name + ".bias"] if name + ".bias" in p else y


def _attention(p: dict[str, torch.Tensor], x: torch.Tensor, name: str, n_heads: int) -> torch.Tensor:
    B, T, C = x.shape
    D = C // n_heads
    qkv = _linear(p, x, name + ".qkv").view(B, T, 3, n_heads, D)  # (B, T, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # heads re-joined
    return _linear(p, y, name + ".proj")


def reference_gpt(p: dict[str, torch.Tensor], cfg: Config, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the GPT that lesson 3 builds, from a ``minilm.GPT``-named state dict."""
    T = idx.shape[1]
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]  # (B, T, C)
    approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        x = x + _attention(p, _layer_norm(p, x, b + "ln_1"), b + "attn", cfg.n_heads)
        hidden = F.gelu(_linear(p, _layer_norm(p, x, b + "ln_2"), b + "mlp.fc"), approximate=approximate)
        x = x + _linear(p, hidden, b + "mlp.proj")
    head = p["wte.weight"] if cfg.tie_embeddings else p["lm_head.weight"]
    return _layer_norm(p, x, "ln_f") @ head.T


def _randomised(model: GPT, seed: int) -> dict[str, torch.Tensor]:
    """Give every parameter (LayerNorms and biases too) random values, so none is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CONFIGS = {
    "biases, tied, exact GELU, sdpa": {},
    "no biases": {"bias": False},
    "untied head": {"tie_embeddings": False},
    "tanh GELU, manual attention": {"activation": "gelu_tanh", "attention": "manual"},
    "one head, d_ff set": {"n_heads": 1, "d_ff": 40},
}


@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_hand_built_gpt_equals_minilm_gpt(changes):
    torch.manual_seed(0)
    cfg = Config(**{"vocab_size": 50, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 24, **changes})
    model = GPT(cfg).eval()
    state = _randomised(model, seed=1)
    idx = torch.randint(cfg.vocab_size, (3, 17))
    targets = torch.randint(cfg.vocab_size, (3, 17))
    logits, loss = model(idx, targets)
    ours = reference_gpt(state, cfg, idx)
    assert logits.shape == ours.shape == (3, 17, cfg.vocab_size)
    torch.testing.assert_close(logits, ours, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(ours.flatten(0, 1), targets.flatten()), atol=1e-5, rtol=1e-5)


def test_hand_built_weights_load_into_minilm_gpt_by_name():
    """Lesson 3's path: hand-made tensors under the library's names load strictly and give equal logits."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=30, d_model=16, n_heads=2, n_layers=1, max_seq_len=8)
    source = GPT(cfg)
    state = _randomised(source, seed=2)
    fresh = GPT(cfg).eval()
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.wte.weight  # loading keeps the tie
    idx = torch.randint(cfg.vocab_size, (2, 8))
    torch.testing.assert_close(fresh(idx)[0], reference_gpt(state, cfg, idx), atol=2e-5, rtol=1e-5)


def test_reference_catches_a_post_layernorm_block():
    """The comparison can fail: a block that normalises after the residual add is a different function."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=20, d_model=16, n_heads=2, n_layers=1, max_seq_len=8)
    model = GPT(cfg).eval()
    state = _randomised(model, seed=3)
    block = model.blocks[0]
    block.forward = lambda x, cache=None: block.ln_2(x + block.attn(x)) + block.mlp(block.ln_2(x + block.attn(x)))
    idx = torch.randint(cfg.vocab_size, (1, 8))
    assert not torch.allclose(model(idx)[0], reference_gpt(state, cfg, idx), atol=1e-3)


def test_initial_loss_is_about_ln_vocab_size():
    """Lesson 3's claim: GPT-2's init gives near-uniform predictions, a first loss near ln V."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=128, d_model=128, n_heads=4, n_layers=4, max_seq_len=64)
    idx = torch.randint(cfg.vocab_size, (4, 64))
    _, loss = GPT(cfg)(idx, torch.randint(cfg.vocab_size, (4, 64)))
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


# ---------------------------------------------------------------------------------------
# BPE by hand (lesson 1)
# ---------------------------------------------------------------------------------------
def bpe_by_hand(words: Counter, alphabet: list[str], min_frequency: int = 2) -> list[tuple[str, str]]:
    """Lesson 1's loop: merge the most frequent adjacent pair until none occurs min_frequency times.

    Ties go to the pair whose tokens come first in the vocabulary (the alphabet in sorted
    order, then merges in the order made), which is the library's rule.
    """
    rank = {t: i for i, t in enumerate(sorted(alphabet))}
    split = {w: list(w) for w in words}
    merges = []
    while True:
        pairs: Counter = Counter()
        for w, n in words.items():
            for pair in zip(split[w], split[w][1:], strict=False):  # adjacent pairs
                pairs[pair] += n
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], -rank[p[0]], -rank[p[1]]))
        if pairs[best] < min_frequency:
            return merges
        merges.append(best)
        rank[best[0] + best[1]] = len(rank)
        for w, s in split.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            split[w] = out


@pytest.mark.parametrize(
    "text",
    ["the cat sat on the mat. the cat ate the hat. that cat!", "low lower lowest newer wider new new low " * 3],
)
def test_bpe_by_hand_makes_the_libraries_merges(text):
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(w for w, _ in pre.pre_tokenize_str(text))
    ours = bpe_by_hand(words, pre_tokenizers.ByteLevel.alphabet())
    assert len(ours) >= 5
    tok = BPETokenizer.train(text, vocab_size=256 + len(ours) + 10)  # room to spare: it stops where we stop
    library = [tuple(m) for m in json.loads(tok.hf.to_str())["model"]["merges"]]
    assert library == ours
    assert tok.vocab_size == 256 + len(ours)
