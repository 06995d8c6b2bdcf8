"""Data pipeline: bundled corpus, cache, deterministic batches, exact resume, rank and accumulation splits."""

import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch

from minilm import data as data_mod
from minilm.config import Config
from minilm.data import (
    BatchSampler,
    DataError,
    eval_batches,
    load_text,
    prepare_data,
    split_text,
    token_dtype,
    unigram_baseline,
)
from minilm.tokenizer import CharTokenizer, TokenizerError

TINY = dict(tokenizer="char", vocab_size=128, max_seq_len=32)


@pytest.fixture(scope="module")
def shakespeare_tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_data(Config(**TINY), cache)


def test_bundled_corpus():
    text = load_text("shakespeare")
    assert 4_500_000 < len(text) < 6_000_000
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert "gutenberg" not in text.lower()  # licence boilerplate removed
    assert "To be, or not to be" in text


def test_split_is_fixed_and_starts_at_a_line():
    text = load_text("shakespeare")
    train, val = split_text(text, 0.1)
    assert train + val == text and train.endswith("\n")
    assert abs(len(val) / len(text) - 0.1) < 0.001
    assert split_text(text, 0.1) == (train, val)


def test_prepare_round_trips_the_text(shakespeare_tiny):
    _, (tok, train, val) = shakespeare_tiny
    assert isinstance(tok, CharTokenizer) and tok.vocab_size <= 128
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    text_train, text_val = split_text(load_text("shakespeare"), 0.1)
    assert tok.decode(val.tolist()) == text_val
    assert tok.decode(train[:10_000].tolist()) == text_train[:10_000]
    assert len(train) == len(text_train)


def test_cache_is_reused(shakespeare_tiny, monkeypatch):
    cache, (tok, train, val) = shakespeare_tiny
    files = sorted(cache.rglob("*.bin"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*_):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(CharTokenizer, "encode_array", fail)
    monkeypatch.setattr(data_mod, "build_tokenizer", fail)
    tok2, train2, val2 = prepare_data(Config(**TINY), cache)
    assert tok2.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(train2, train)
    np.testing.assert_array_equal(val2, val)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_user_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("goodbye moon\r\n" * 200, encoding="utf-8")  # Windows line ends
    (tmp_path / "notes.md").write_text("ignored: not .txt")
    cfg = Config(**TINY, dataset=str(tmp_path / "a.txt"))
    tok, train, val = prepare_data(cfg, tmp_path / "cache")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == "hello world\n" * 200
    folder_text = load_text(tmp_path)
    assert folder_text == ("hello world\n" * 200).strip("\n") + "\n\n" + ("goodbye moon\n" * 200).strip("\n") + "\n"
    tok, train, val = prepare_data(Config(**TINY, dataset=str(tmp_path)), tmp_path / "cache")
    assert tok.decode(np.concatenate([train, val]).tolist()) == folder_text


def test_bpe_on_user_text_uses_uint32_for_huge_vocabularies(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(load_text("shakespeare")[:50_000])
    tok, train, val = prepare_data(Config(dataset=str(path), tokenizer="bpe", vocab_size=70_000), tmp_path)
    assert train.dtype == np.uint32 and tok.vocab_size < 70_000
    assert tok.decode(val.tolist()) == split_text(path.read_text(), 0.1)[1]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_bad_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*'shakespeare'"):
        prepare_data(Config(**{**TINY, "dataset": str(tmp_path / "missing.txt")}), tmp_path)
    with pytest.raises(DataError, match="no .txt files"):
        load_text(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")


def test_char_vocabulary_too_large_for_vocab_size(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x4E00 + i) for i in range(300)) * 10, encoding="utf-8")
    with pytest.raises(TokenizerError, match="300 distinct characters but vocab_size is 128"):
        prepare_data(Config(**{**TINY, "dataset": str(path)}), tmp_path)


# --- batches --------------------------------------------------------------------------
TOKENS = np.arange(5000, dtype=np.uint16) % 997  # small: epochs wrap within a few steps


def take(sampler: BatchSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_shifted_windows_and_deterministic():
    s = BatchSampler(TOKENS, batch_size=4, seq_len=16, seed=7)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert_same(take(BatchSampler(TOKENS, 4, 16, seed=7), 30), [(x, y)] + take(s, 29))
    assert not torch.equal(BatchSampler(TOKENS, 4, 16, seed=8).next_batch()[0], x)


def test_each_epoch_visits_every_window_once():
    s = BatchSampler(TOKENS, batch_size=1, seq_len=16, seed=0)
    starts = np.concatenate([s.window_starts(i) for i in range(s.n_windows)])
    phase = starts.min() % 16
    assert sorted(starts) == list(range(phase, phase + 16 * s.n_windows, 16))
    assert starts.max() + 17 <= len(TOKENS)


def test_exact_resume_from_state():
    s = BatchSampler(TOKENS, batch_size=3, seq_len=16, seed=1)
    take(s, 50)  # crosses several epochs
    state = json.loads(json.dumps(s.state_dict()))  # survives a round trip through JSON
    expected = take(s, 60)
    resumed = BatchSampler(TOKENS, batch_size=3, seq_len=16, seed=1)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 60), expected)


def test_resume_refuses_a_different_stream():
    state = BatchSampler(TOKENS, 4, 16, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"trained with seed 1 but this run has seed 2; resume with .*--seed 1"):
        BatchSampler(TOKENS, 4, 16, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="trained with max_seq_len 16 but this run has 8"):
        BatchSampler(TOKENS, 4, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="resume with the dataset, tokenizer and val_fraction"):
        BatchSampler(TOKENS[:-1], 4, 16, seed=1).load_state_dict(state)


def test_resume_with_another_batch_size_continues_the_stream():
    big = BatchSampler(TOKENS, batch_size=4, seq_len=16, seed=3)
    take(big, 5)  # 20 windows
    state = big.state_dict()
    small = BatchSampler(TOKENS, batch_size=2, seq_len=16, seed=3)
    small.load_state_dict(state)
    assert small.step == 10
    x, _ = big.next_batch()
    assert torch.equal(torch.cat([small.next_batch()[0], small.next_batch()[0]]), x)
    odd = BatchSampler(TOKENS, batch_size=3, seq_len=16, seed=3)
    with pytest.raises(ValueError, match="use a batch_size x world_size that divides 20, such as the checkpoint's 4"):
        odd.load_state_dict(state)  # 20 windows are not a whole number of batches of 3


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_global_batch(world_size):
    single = BatchSampler(TOKENS, batch_size=2 * world_size, seq_len=16, seed=5)
    ranks = [BatchSampler(TOKENS, 2, 16, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(40):  # crosses epoch boundaries
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_accumulation_micro_batches_equal_one_big_batch():
    k = 4
    big = BatchSampler(TOKENS, batch_size=2 * k, seq_len=16, seed=9)
    micro = BatchSampler(TOKENS, batch_size=2, seq_len=16, seed=9)
    for _ in range(10):
        x, _ = big.next_batch()
        assert torch.equal(torch.cat([micro.next_batch()[0] for _ in range(k)]), x)


def test_workers_give_the_same_batches_and_resume(tmp_path):
    path = tmp_path / "tokens.bin"
    TOKENS.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    expected = take(BatchSampler(tokens, 4, 16, seed=2), 12)
    s = BatchSampler(tokens, 4, 16, seed=2, num_workers=1, pin_memory=True)
    got = list(itertools.islice(iter(s), 6))
    state = s.state_dict()
    s.close()
    resumed = BatchSampler(tokens, 4, 16, seed=2, num_workers=1)
    resumed.load_state_dict(state)
    got += take(resumed, 6)
    resumed.close()
    assert_same(got, expected)


def test_worker_copies_reopen_the_memmap_instead_of_copying_it(tmp_path):
    path = tmp_path / "tokens.bin"
    big = np.arange(1_000_000, dtype=np.uint16)
    big.tofile(path)
    s = BatchSampler(np.memmap(path, dtype=np.uint16, mode="r"), 2, 8, seed=0)
    blob = pickle.dumps(data_mod._StepDataset(s))
    assert len(blob) < 10_000  # not the 2 MB of tokens
    step, x, y = pickle.loads(blob)[3]
    assert step == 3 and torch.equal(x, s.get_batch(3)[0])


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError, match="too few"):
        BatchSampler(np.arange(20, dtype=np.uint16), 2, 16)
    with pytest.raises(DataError, match="fewer than one sequence"):
        eval_batches(np.arange(10, dtype=np.uint16), 2, 16, 3)


def test_eval_batches_are_fixed_and_split_by_rank():
    a = eval_batches(TOKENS, 4, 16, n=5)
    assert len(a) == 5 and all(x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) for x, y in a)
    assert_same(a, eval_batches(TOKENS, 4, 16, n=5))
    first, last = a[0][0][0, 0].item(), a[-1][1][-1, -1].item()
    assert first == TOKENS[0] and last == TOKENS[-1]  # spread over the whole split
    ranks = [eval_batches(TOKENS, 2, 16, n=5, rank=r, world_size=2) for r in range(2)]
    for i in range(5):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), a[i][0])


def test_unigram_baseline():
    v = 10
    uniform = np.arange(1000) % v
    assert unigram_baseline(uniform, uniform, v) == pytest.approx(math.log(v))
    train = np.array([0, 0, 0, 1])
    val = np.array([0, 1])
    p = np.array([4, 2, 1]) / 7  # add-one counts for ids 0, 1, 2
    assert unigram_baseline(train, val, 3) == pytest.approx(-(math.log(p[0]) + math.log(p[1])) / 2)


def test_unigram_baseline_on_shakespeare(shakespeare_tiny):
    _, (tok, train, val) = shakespeare_tiny
    h = unigram_baseline(train, val, tok.vocab_size)
    assert 3.0 < h < math.log(tok.vocab_size)  # English letters: ~3.3 nats, well below uniform


def test_workers_leave_the_global_rng_alone(tmp_path):
    """Starting the background loader must not draw from torch's global RNG (it also draws dropout masks)."""
    s = BatchSampler(TOKENS, 4, 16, seed=2, num_workers=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    s.next_batch()  # starts the workers
    assert torch.equal(torch.rand(3), expected)
    s.close()


def test_workers_never_pin_only_the_main_process_does(monkeypatch):
    # A forked DataLoader worker cannot touch CUDA: pinning there crashed every config with
    # num_workers > 0 and pin_memory on a GPU. Pinning belongs to the loader, in this process.
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or t)
    s = BatchSampler(TOKENS, 4, 16, seed=2)
    s.pin_memory = True  # as on a CUDA machine (the constructor turns it off without CUDA)
    step, x, y = data_mod._StepDataset(s)[3]  # what a worker runs
    assert step == 3 and pinned == [] and torch.equal(x, s.get_batch(3)[0])
    assert len(pinned) == 2  # get_batch, in this process, pins x and y
