"""Closed-form FLOPs against PyTorch's FlopCounterMode on real forward and backward passes.

Tolerance: exact (integer equality). Both sides count the same thing, 2·m·n·k per matrix
multiplication and nothing else (no LayerNorm, GELU, softmax, loss or optimizer FLOPs),
so no residual is expected and none is allowed. The only difference is a convention,
tested explicitly: fused SDPA's backward recomputes the attention scores, which
FlopCounterMode counts (backward = 2.5 x forward, 14·L·s·d per token instead of 12) and the
model-FLOPs total does not; flop_breakdown reports it separately (sdpa_backward_recompute),
as it does gradient checkpointing's recomputed forward.
"""

import math
import warnings

import pytest
import torch

from minilm.config import Config, load_config
from minilm.counting import count_parameters
from minilm.flops import (
    CHINCHILLA_TOKENS_PER_PARAMETER,
    chinchilla_tokens,
    compute_optimal,
    count_flops,
    flop_breakdown,
    flops_per_step,
    flops_per_token,
    mfu,
    tokens_per_second_at,
    training_flops,
)
from minilm.hardware import (
    ACCELERATORS,
    Accelerator,
    accelerator_table,
    get_accelerator,
    measure_matmul_flops,
    peak_flops,
    register_accelerator,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = [
    dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=32),
    dict(vocab_size=300, d_model=48, n_heads=3, n_layers=3, max_seq_len=64, d_ff=100, bias=False),
    dict(vocab_size=64, d_model=64, n_heads=8, n_layers=1, max_seq_len=48, tie_embeddings=False),
]


def cfg_of(shape: dict, **changes) -> Config:
    return Config(**{**shape, **changes})


@pytest.mark.parametrize("shape", SHAPES, ids=["tied", "no-bias-dff", "untied"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["", "ckpt"])
def test_manual_attention_matches_flop_counter_exactly(shape, ckpt):
    cfg = cfg_of(shape, attention="manual", gradient_checkpointing=ckpt)
    counted = count_flops(cfg, batch_size=2, device="cpu")
    fb = flop_breakdown(cfg)
    assert counted.forward == fb.forward * counted.tokens
    # The backward counted includes checkpointing's recomputed forward when it is on.
    assert counted.backward == (fb.backward + fb.checkpoint_recompute) * counted.tokens
    assert counted.total == fb.hardware_total * counted.tokens


@pytest.mark.parametrize("shape", SHAPES, ids=["tied", "no-bias-dff", "untied"])
def test_chunked_loss_costs_the_same_flops_spent_in_the_forward_call(shape):
    # The trainer's loss (minilm.loss) computes the head's two gradient matmuls during forward.
    cfg = cfg_of(shape, attention="manual")
    counted = count_flops(cfg, batch_size=2, device="cpu", return_logits=False)
    fb = flop_breakdown(cfg)
    head_backward = 2 * fb.lm_head  # d h and d W: 4·V·d per token
    assert counted.forward == (fb.forward + head_backward) * counted.tokens
    assert counted.backward == (fb.backward - head_backward) * counted.tokens
    assert counted.total == fb.hardware_total * counted.tokens


@pytest.mark.parametrize("shape", SHAPES, ids=["tied", "no-bias-dff", "untied"])
def test_sdpa_on_cpu_matches_with_flash_formulas(shape):
    cfg = cfg_of(shape, attention="sdpa")
    counted = count_flops(cfg, batch_size=2, device="cpu")
    fb = flop_breakdown(cfg, device_type="cpu")
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in counted.by_op  # the fused kernel ran, and counted
    assert counted.total == fb.hardware_total * counted.tokens  # 6·N_mm + 14·L·s·d
    recompute = 2 * cfg.n_layers * cfg.max_seq_len * cfg.d_model  # the flash backward's extra q·kᵀ
    assert fb.hardware_total - fb.total == fb.sdpa_backward_recompute == recompute
    # Without the custom formulas torch 2.13 counts the CPU kernel as zero: the gap is all of attention.
    from torch.utils.flop_counter import FlopCounterMode

    from minilm.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with FlopCounterMode(display=False) as plain:
        model(idx, idx)[1].backward()
    attention_counted = (fb.attention_scores * 3 + fb.sdpa_backward_recompute) * counted.tokens
    assert plain.get_total_flops() == counted.total - attention_counted


def test_sdpa_with_dropout_on_cpu_is_the_math_path():
    cfg = cfg_of(SHAPES[0], attention="sdpa", dropout=0.1)
    counted = count_flops(cfg, batch_size=2, device="cpu")
    fb = flop_breakdown(cfg, device_type="cpu")
    assert fb.sdpa_backward_recompute == 0
    assert counted.total == fb.total * counted.tokens


@pytest.mark.parametrize("name", ["small", "base", "large"])
def test_shipped_configs_on_meta_device(name):
    # Full size at sequence length 1024, without allocating: SDPA decomposes into matmuls on meta.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(name).replace(gradient_checkpointing=False)
    counted = count_flops(cfg, batch_size=1, device="meta")
    assert counted.total == flops_per_token(cfg) * counted.tokens


def test_six_n_rule_written_out():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8, max_seq_len=1024)
    d, f, V, L, s = 512, 2048, 16000, 8, 1024
    n_mm = L * (4 * d * d + 2 * d * f) + V * d
    assert flop_breakdown(cfg).matmul_parameters == n_mm
    assert flops_per_token(cfg) == 6 * n_mm + 12 * L * s * d
    fb = flop_breakdown(cfg)
    assert fb.backward == 2 * fb.forward and fb.total == 3 * fb.forward
    assert sum(v for _, v in fb.rows()) == fb.total
    # N_mm is not the parameter count: positions, biases and norms are out; the tied head is in (as V·d).
    pc = count_parameters(cfg)
    assert n_mm == pc.token_embedding + L * (4 * d * d + 2 * d * f) < pc.total
    # Attention's share of the FLOPs grows with the sequence length.
    short, long = flop_breakdown(cfg, seq_len=128), flop_breakdown(cfg, seq_len=4096)
    assert long.attention_share > fb.attention_share > short.attention_share


def test_tied_head_still_costs_flops():
    cfg = Config(vocab_size=1000, d_model=64, n_heads=4, n_layers=2)
    assert flops_per_token(cfg) == flops_per_token(cfg.replace(tie_embeddings=False))


def test_flops_per_step_counts_every_token_of_the_step():
    cfg = Config(batch_size=4, grad_accumulation_steps=3, world_size=2, max_seq_len=256)
    assert flops_per_step(cfg) == flops_per_token(cfg) * 4 * 3 * 2 * 256


def test_mfu_by_hand_and_inverse():
    cfg = Config(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024, bf16=True)
    tps = 100_000.0
    expected = tps * flops_per_token(cfg) / 312e12
    assert mfu(tps, cfg, 312e12) == pytest.approx(expected, rel=1e-12)
    assert mfu(tps, cfg, "A100 80GB") == pytest.approx(expected, rel=1e-12)  # looked up at bf16
    assert mfu(tps, cfg.replace(bf16=False), "A100 80GB") == pytest.approx(tps * flops_per_token(cfg) / 19.5e12)
    assert mfu(2 * tps, cfg, 312e12, n_devices=2) == pytest.approx(expected)
    assert mfu(tokens_per_second_at(cfg, "H100 SXM", mfu=0.37), cfg, "H100 SXM") == pytest.approx(0.37)
    # Checkpointing re-runs the forward: the same hardware efficiency gives fewer tokens per second.
    ckpt = cfg.replace(gradient_checkpointing=True)
    assert tokens_per_second_at(ckpt, "H100 SXM") < tokens_per_second_at(cfg, "H100 SXM")


def test_chinchilla():
    assert CHINCHILLA_TOKENS_PER_PARAMETER == 20
    assert chinchilla_tokens(1_000_000) == 20_000_000
    assert training_flops(10**6, 2 * 10**7) == 6 * 10**6 * 2 * 10**7
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8, batch_size=16, grad_accumulation_steps=4)
    co = compute_optimal(cfg)
    n = count_parameters(cfg).total
    assert co.tokens == 20 * n and co.flops_6nd == 6 * n * 20 * n
    assert co.optimizer_steps == math.ceil(20 * n / (16 * 4 * 1024))
    assert co.flops == flops_per_token(cfg) * co.tokens


def test_hardware_table():
    for name in ["A100 80GB", "H100 SXM", "H200 SXM", "RTX 4090", "RTX 3090", "T4", "V100 SXM2", "L4"]:
        acc = ACCELERATORS[name]
        assert acc.memory_gb > 0 and acc.fp32 and acc.fp16 and "dense" in acc.source
        assert acc.fp16 >= acc.fp32  # tensor cores beat plain fp32 everywhere
    assert peak_flops("H100 SXM", "bf16") == 989.4e12  # dense; the datasheet's 1979 is with sparsity
    assert get_accelerator("h100-sxm") is ACCELERATORS["H100 SXM"]
    with pytest.raises(ValueError, match="bf16"):
        peak_flops("T4", "bf16")  # Turing has no bf16
    with pytest.raises(KeyError):
        get_accelerator("GPU 9000")
    assert "H200 SXM" in accelerator_table() and accelerator_table("markdown").startswith("| device |")


def test_register_accelerator():
    acc = Accelerator("Test GPU 48", memory_gb=48, bf16=362e12, fp16=362e12, fp32=91.6e12)
    try:
        register_accelerator(acc)
        assert peak_flops("test gpu 48", "fp16") == 362e12
        with pytest.raises(ValueError):
            register_accelerator(acc)
        register_accelerator(Accelerator("Test GPU 48", 48, 1.0, 1.0, 1.0), overwrite=True)
        assert peak_flops("Test GPU 48", "bf16") == 1.0
    finally:
        ACCELERATORS.pop("Test GPU 48", None)


def test_measure_matmul_flops_is_a_plausible_rate():
    rate = measure_matmul_flops(size=256, min_seconds=0.02)
    assert 1e8 < rate < 1e15  # at least 0.1 GFLOP/s; less than a petaflop on a CPU
