"""Fixtures shared by the test files: one CPU thread, and a micro model on a slice of Shakespeare."""

from pathlib import Path

import pytest
import torch

from minilm import Config
from minilm.data import load_text

# A 2-layer, d_model 32 model on 16-character sequences: a training step takes milliseconds.
MICRO = dict(
    vocab_size=72,  # the distinct characters of the micro corpus
    d_model=32,
    n_heads=2,
    n_layers=2,
    max_seq_len=16,
    tokenizer="char",
    learning_rate=3e-3,
    batch_size=4,
    eval_batches=2,
    device="cpu",
)


@pytest.fixture
def one_thread():
    """Micro models gain nothing from more threads, and on a busy machine idle-spinning threads cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory) -> Path:
    """The first 40,000 characters of the bundled Shakespeare, as a text file."""
    path = tmp_path_factory.mktemp("data") / "micro.txt"
    path.write_text(load_text("shakespeare")[:40_000])
    return path


@pytest.fixture(scope="session")
def micro_config(micro_corpus):
    """``micro_config(output_dir, **changes)``: a :data:`MICRO` config trained on :func:`micro_corpus`."""

    def make(output_dir, **changes) -> Config:
        return Config(**{**MICRO, "dataset": str(micro_corpus), "output_dir": str(output_dir), **changes})

    return make
