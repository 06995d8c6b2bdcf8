"""Tokenizers: exact round trips, determinism, vocabulary limits, save/load with clear errors."""

import numpy as np
import pytest

from minilm.config import Config
from minilm.data import load_text
from minilm.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    TokenizerError,
    _safe_chunks,
    build_tokenizer,
    load_tokenizer,
)

TRICKY = [
    "",
    "To be, or not to be: that is the question.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\ncarriage returns\r",
    "naïve café — “quotes” ‘single’ 日本語 🙂👍🏽 \u200b zero-width",
    "'s 't 're 've 'm 'll 'd contractions, 123 4567 numbers",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text("shakespeare")[:300_000]  # a slice keeps BPE training well under a second


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus, vocab_size=600)


def test_char_round_trip_and_vocabulary(corpus):
    tok = CharTokenizer.from_text(corpus)
    assert list(tok.chars) == sorted(set(corpus))  # code-point order: deterministic
    ids = tok.encode(corpus)
    assert max(ids) < tok.vocab_size and tok.decode(ids) == corpus
    np.testing.assert_array_equal(tok.encode_array(corpus), ids)


def test_char_unknown_character_is_a_clear_error(corpus):
    tok = CharTokenizer.from_text(corpus)
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(TokenizerError, match="U\\+00E9.*tokenizer='bpe'"):
            encode("café")
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([-1])


def test_char_vocabulary_must_fit_vocab_size():
    text = "".join(chr(0x100 + i) for i in range(200))  # 200 distinct characters
    with pytest.raises(TokenizerError, match="200 distinct characters but vocab_size is 128"):
        build_tokenizer(Config(tokenizer="char", vocab_size=128), text)
    assert build_tokenizer(Config(tokenizer="char", vocab_size=200), text).vocab_size == 200


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_is_deterministic(corpus, bpe):
    assert bpe.vocab_size == 600
    ids = bpe.encode(corpus[:20_000])
    assert len(ids) < 20_000 / 2  # merges compress English well below one token per byte
    assert bpe.decode(ids) == corpus[:20_000]
    again = BPETokenizer.train(corpus, vocab_size=600)
    assert again.fingerprint == bpe.fingerprint
    assert again.encode(corpus[:5000]) == bpe.encode(corpus[:5000])


def test_bpe_chunked_encoding_equals_one_call(corpus, bpe):
    chunks = _safe_chunks(corpus, size=10_000)
    assert len(chunks) > 10 and "".join(chunks) == corpus
    np.testing.assert_array_equal(bpe.encode_array(corpus), bpe.encode(corpus))


def test_bpe_vocab_limits(corpus):
    with pytest.raises(TokenizerError, match="vocab_size >= 256"):
        build_tokenizer(Config(tokenizer="bpe", vocab_size=128), corpus)
    # A vocabulary larger than the text supports stops early, never exceeds vocab_size.
    tok = build_tokenizer(Config(tokenizer="bpe", vocab_size=60_000), corpus[:20_000])
    assert 256 < tok.vocab_size < 60_000


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_decodes_the_same(tmp_path, corpus, bpe, kind):
    tok = CharTokenizer.from_text(corpus) if kind == "char" else bpe
    tok.save(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert type(loaded) is type(tok) and loaded.fingerprint == tok.fingerprint
    sample = corpus[1000:3000]
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.decode(tok.encode(sample)) == sample


def test_load_missing_or_damaged_is_a_clear_error(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="no saved tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    bpe.save(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="damaged"):
        load_tokenizer(tmp_path / "t")
