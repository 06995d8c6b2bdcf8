"""Inference cost: the KV-cache formula matches the cache generation builds; FLOPs match FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minilm import GPT, Config, load_config
from minilm.attention import KVCache
from minilm.generation import generate
from minilm.inference import generation_flops, generation_flops_total, kv_cache_bytes, kv_cache_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = Config(vocab_size=40, d_model=32, n_heads=4, n_layers=3, d_ff=80, max_seq_len=20, attention="manual")


def test_bytes_per_token_is_two_layers_d_model_bytes():
    small = load_config("small")
    assert kv_cache_bytes_per_token(small) == 2 * 8 * 512 * 2 == 16_384
    assert kv_cache_bytes_per_token(small, bytes_per_element=4) == 32_768
    assert kv_cache_bytes(small, context_len=1024, batch_size=8) == 8 * 1024 * 16_384
    assert kv_cache_bytes(load_config("tiny"), bytes_per_element=4) == 128 * 2 * 4 * 128 * 4


def test_formula_matches_the_cache_generation_fills():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        model(torch.zeros(3, 11, dtype=torch.long), cache=cache)  # 3 sequences of 11 tokens, fp32
    held = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in cache)
    assert held == kv_cache_bytes(CFG, context_len=11, batch_size=3, bytes_per_element=4)


def counted(model, idx, cache=None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(idx, cache=cache)
    return counter.get_total_flops()


# From n = 2: at n = 1 the 1×1 score einsum runs as a broadcast multiply, which FlopCounterMode does not count.
@pytest.mark.parametrize("n", [2, 7, 20])
def test_flops_per_generated_token_match_the_counter(n):
    """The manual attention path is all matmuls: FlopCounterMode counts exactly what the formula says."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, 40, (1, n))
    assert counted(model, idx) == generation_flops(CFG, n, use_cache=False)
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        if n > 1:
            model(idx[:, :-1], cache=cache)
    assert counted(model, idx[:, -1:], cache) == generation_flops(CFG, n, use_cache=True)
    assert generation_flops(CFG, n, use_cache=False) == n * generation_flops(CFG, n, use_cache=True)


def test_total_flops_of_a_generation_match_the_counter():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, 40, (1, 5))
    for use_cache in (True, False):
        with FlopCounterMode(display=False) as counter:
            generate(model, idx, max_new_tokens=9, temperature=0, use_cache=use_cache)
        assert counter.get_total_flops() == generation_flops_total(CFG, 5, 9, use_cache=use_cache)
    assert generation_flops_total(CFG, 5, 9, use_cache=False) > 5 * generation_flops_total(CFG, 5, 9)


def test_context_beyond_max_seq_len_is_an_error():
    with pytest.raises(ValueError, match="context_len must be in 1..max_seq_len=20, got 21"):
        generation_flops(CFG, 21)
    with pytest.raises(ValueError, match="prompt_len \\+ new_tokens - 1 must be"):
        generation_flops_total(CFG, 10, 12)
