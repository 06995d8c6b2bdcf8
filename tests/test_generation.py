"""Generation: the KV cache changes no output; greedy, temperature, top-k and top-p do what they say; seeds repeat."""

import json
import math

import pytest
import torch

from minilm import GPT, Config
from minilm.attention import KVCache
from minilm.cli import main
from minilm.generation import generate, generate_text, next_token_probs, sample_next, top_k_filter, top_p_filter

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, max_seq_len=24, dropout=0.0)


def model_for(impl: str = "sdpa", **changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(**{**SMALL, "attention": impl, **changes}))
    # Larger weights than the init: logits far from uniform, so greedy picks are clear-cut.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_cached_logits_equal_uncached(impl):
    """Prefill 5 tokens, then feed one token at a time: each step's logits equal a full forward's last row."""
    model = model_for(impl)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        logits, _ = model(idx[:, :5], cache=cache)
        assert torch.allclose(logits, model(idx[:, :5])[0], atol=1e-5)
        for t in range(5, 12):
            step_logits, _ = model(idx[:, t : t + 1], cache=cache)
            full, _ = model(idx[:, : t + 1])
            # The same sums over fewer rows, which the matmul kernels block differently: last-bit differences,
            # grown by the 8x weights to ~1e-4 on logits of up to ~25 (a wrong cache is off by ~1).
            assert torch.allclose(step_logits[:, -1], full[:, -1], atol=2e-4), t
        assert len(cache[0]) == 12 and cache[0].k.shape == (2, 4, 12, 8)


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_greedy_with_and_without_cache_identical(impl):
    """Token for token, past max_seq_len too (where the window slides and the cache is set aside)."""
    model = model_for(impl)
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(2))
    cached = generate(model, idx, max_new_tokens=40, temperature=0, use_cache=True)
    uncached = generate(model, idx, max_new_tokens=40, temperature=0, use_cache=False)
    assert cached.shape == (3, 44) and 44 > model.cfg.max_seq_len
    assert torch.equal(cached, uncached)
    assert torch.equal(model.generate(idx, 40, temperature=0), cached)  # the thin wrapper on GPT


def test_cache_feeding_several_tokens_at_once_masks_the_future():
    """A chunk of 3 new tokens after a cached prefix: each query sees the prefix and its own past only."""
    model = model_for("sdpa")
    idx = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        model(idx[:, :6], cache=cache)
        chunk, _ = model(idx[:, 6:], cache=cache)
        full, _ = model(idx)
    assert torch.allclose(chunk, full[:, 6:], atol=1e-4)


def test_cache_past_max_seq_len_is_an_error():
    model = model_for()
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        model(torch.zeros(1, 24, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence length 25 exceeds max_seq_len=24"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def brute_force_nucleus(probs: list[float], p: float) -> set[int]:
    """The smallest set of likeliest tokens whose probability reaches p, by trying sizes 1, 2, ..."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    for size in range(1, len(probs) + 1):
        if math.fsum(probs[i] for i in order[:size]) >= p:
            return set(order[:size])
    return set(order)


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.25, 0.1]])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}  # 0.5 alone reaches 0.3
    assert kept(0.74) == {1, 3}  # 0.5 + 0.25 = 0.75 reaches 0.74; 0.5 alone does not
    assert kept(0.76) in ({1, 3, 2}, {1, 3, 4})  # a third token is needed (the two 0.1s tie: either one)
    assert kept(0.96) == {0, 1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Random distributions, against the brute-force definition (p away from any partial sum's rounding).
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        logits = torch.randn(1, 30, generator=gen, dtype=torch.float64) * 2
        probs = torch.softmax(logits, -1)[0].tolist()
        p = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.98 + 0.01
        assert set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()) == brute_force_nucleus(
            probs, p
        )
    # The kept tokens' probabilities are renormalised: they sum to 1, the rest are 0.
    renormed = next_token_probs(torch.tensor([[0.05, 0.5, 0.1, 0.25, 0.1]]).log(), top_p=0.74)
    assert torch.allclose(renormed, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3, 0.0]]))
    with pytest.raises(ValueError, match="top_p must be in"):
        top_p_filter(logits, 0.0)


def test_top_k_keeps_the_k_likeliest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(top_k_filter(logits, 99)).all()  # k beyond V keeps everything
    probs = next_token_probs(logits, top_k=3)
    assert (probs > 0).sum() == 3 and torch.allclose(probs.sum(), torch.tensor(1.0))
    # Only the kept tokens are ever drawn.
    draws = sample_next(logits.expand(500, 5), top_k=2, generator=torch.Generator().manual_seed(5))
    assert set(draws.flatten().tolist()) == {1, 3}
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        top_k_filter(logits, 0)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    base = next_token_probs(logits, temperature=1.0)
    cold, hot = next_token_probs(logits, temperature=0.5), next_token_probs(logits, temperature=2.0)
    assert torch.allclose(base, torch.softmax(logits, -1))
    assert cold[0, 2] > base[0, 2] > hot[0, 2] > 1 / 3  # the favourite gains when cold, loses when hot
    assert torch.allclose(cold, torch.softmax(logits * 2, -1))  # T = 0.5 is logits doubled
    assert next_token_probs(logits, temperature=0).tolist() == [[0.0, 0.0, 1.0]]  # T = 0: greedy
    entropy = lambda q: float(-(q * q.log()).sum())  # noqa: E731
    assert entropy(cold) < entropy(base) < entropy(hot) < math.log(3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        next_token_probs(logits, temperature=-1)


def test_greedy_ignores_the_generator_and_the_filters():
    model = model_for()
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 10, temperature=0, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 10, temperature=0, top_k=3, top_p=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_seeded_sampling_repeats_and_seeds_differ():
    model = model_for()
    idx = torch.tensor([[1, 2, 3]])
    draw = lambda seed, **kw: generate(  # noqa: E731
        model, idx, 30, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    assert torch.equal(draw(7, top_p=0.9), draw(7, top_p=0.9, use_cache=False))  # the cache changes no draw
    assert torch.equal(draw(7, top_k=5), draw(7, top_k=5))


def test_eos_stops_every_row():
    model = model_for()
    idx = torch.tensor([[1, 2, 3]])
    first = int(generate(model, idx, 1, temperature=0)[0, -1])
    out = generate(model, idx, 20, temperature=0, eos_id=first)
    assert out.shape == (1, 4)


class CharTokenizer:
    """Ids 0..39 are letters and digits; the model has 50 outputs, so ids 40..49 must never be drawn."""

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,\n"
    vocab_size = len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_generate_text_masks_ids_beyond_the_tokenizer_and_is_reexported():
    from minilm import trainer

    assert trainer.generate_text is generate_text
    model = model_for()
    texts = generate_text(
        model, CharTokenizer(), "to be", 60, temperature=2.0, top_k=None, top_p=0.95, num_samples=3,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(texts) == 3 and all(t.startswith("to be") and len(t) == 65 for t in texts)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_text(model, CharTokenizer(), "")


def test_cli_sample_top_p(micro_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    cfg = micro_config(tmp_path / "run", max_steps=2, warmup_steps=1, eval_steps=2, save_steps=2)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--no_progress"]) == 0
    capsys.readouterr()
    sample = ["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max_new_tokens", "20"]
    assert main([*sample, "--top_k", "0", "--top_p", "0.5"]) == 0
    nucleus = capsys.readouterr().out
    assert nucleus.startswith("ROMEO:")
    assert main([*sample, "--top_k", "0", "--top_p", "0.5"]) == 0
    assert capsys.readouterr().out == nucleus  # seeded
    with pytest.raises(SystemExit) as exc:
        main([*sample, "--top_p", "1.5"])
    assert exc.value.code == 2 and "--top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
