"""The closed-form parameter count equals what PyTorch counts, for every shipped config and 240 random ones.

Models are built on the meta device: shapes without storage, so the large config costs nothing.
"""

import math
import random
from pathlib import Path

import pytest
import torch

from minilm.config import Config, load_config
from minilm.counting import count_parameters, decay_split, parameter_shapes, parameter_table
from minilm.model import GPT

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*/*.json"))


def meta_model(cfg: Config) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def assert_counts_match(cfg: Config) -> None:
    model = meta_model(cfg)
    pc = count_parameters(cfg)
    params = list(model.parameters())  # a tied weight appears once
    assert pc.total == sum(p.numel() for p in params)
    assert sum(n for _, n in pc.rows()) == pc.total
    assert pc.non_embedding == model.num_parameters(non_embedding=True)
    # The per-tensor listing is the model's, name for name and shape for shape.
    assert parameter_shapes(cfg) == [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    matrices, vectors = decay_split(cfg)
    assert matrices == sum(p.numel() for p in params if p.dim() >= 2)
    assert vectors == sum(p.numel() for p in params if p.dim() < 2)


def test_shipped_configs_found():
    names = {p.parent.name + "/" + p.stem for p in SHIPPED}
    assert {"training/tiny_model", "training/small_model", "training/base_model", "training/large_model"} <= names
    assert {"design_original/small_model", "design_original/base_model", "design_original/large_model"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_count_is_exact(path):
    assert_counts_match(load_config(path, check_estimate=False))


def test_design_sizes_as_seed_states():
    # SEED.md: counted GPT-2 style, the design's three configs have these many parameters.
    expected = {"small": 33_936_384, "base": 110_418_432, "large": 354_560_000}
    for name, n in expected.items():
        cfg = load_config(ROOT / "configs" / "design_original" / f"{name}_model.json", check_estimate=False)
        assert count_parameters(cfg).total == n


def test_gpt2_small_reference():
    cfg = Config(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024)
    assert count_parameters(cfg).total == 124_439_808  # Hugging Face's GPT-2 small


def random_config(rng: random.Random) -> Config:
    n_heads = rng.choice([1, 2, 3, 4, 6, 8])
    d_model = n_heads * rng.choice([1, 4, 7, 8, 16, 32])
    return Config(
        vocab_size=rng.randint(1, 3000),
        d_model=d_model,
        n_heads=n_heads,
        n_layers=rng.randint(1, 6),
        d_ff=rng.choice([None, None, rng.randint(1, 4 * d_model + 7)]),
        max_seq_len=rng.randint(1, 512),
        bias=rng.random() < 0.5,
        tie_embeddings=rng.random() < 0.5,
        attention=rng.choice(["sdpa", "manual"]),
        activation=rng.choice(["gelu", "gelu_tanh"]),
    )


@pytest.mark.parametrize("chunk", range(4))
def test_random_configs_count_is_exact(chunk):
    rng = random.Random(1000 + chunk)
    seen = set()
    for _ in range(60):  # 4 chunks x 60 = 240 configs
        cfg = random_config(rng)
        seen.add((cfg.bias, cfg.tie_embeddings, cfg.d_ff is None))
        assert_counts_match(cfg)
    assert len(seen) >= 6  # the sweep really mixes bias, tying and d_ff variants


def test_per_layer_formula_in_the_docstring():
    for d in (8, 64, 768):
        cfg = Config(vocab_size=10, d_model=d, n_heads=1, n_layers=1, max_seq_len=4)
        assert count_parameters(cfg).per_layer == 12 * d * d + 13 * d
        f = 3 * d + 1
        pc = count_parameters(cfg.replace(d_ff=f))
        assert pc.per_layer == 4 * d * d + 2 * d * f + f + 9 * d


def test_tied_weights_are_one_tensor_counted_once():
    cfg = Config(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
    tied, untied = meta_model(cfg), meta_model(cfg.replace(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight  # the same Parameter, not a copy
    assert untied.lm_head.weight is not untied.wte.weight
    n_tied, n_untied = count_parameters(cfg).total, count_parameters(cfg.replace(tie_embeddings=False)).total
    assert n_untied - n_tied == 97 * 32
    assert sum(p.numel() for p in tied.parameters()) == n_tied


def test_tables_show_the_total():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8)
    total = count_parameters(cfg).total
    assert f"{total:,}" in parameter_table(cfg)
    md = parameter_table(cfg, fmt="markdown")
    assert md.startswith("| component |") and f"{total:,}" in md
    with pytest.raises(ValueError):
        parameter_table(cfg, fmt="html")


def test_parameter_shapes_sizes_sum_to_total():
    cfg = Config(vocab_size=50, d_model=24, n_heads=3, n_layers=3, d_ff=40, bias=False, tie_embeddings=False)
    assert sum(math.prod(s) for _, s in parameter_shapes(cfg)) == count_parameters(cfg).total
