"""torch.compile on a CPU only where the run is long enough to repay its warm-up."""

import torch

from minilm.compile_policy import COMPILE_SAVING, COMPILE_WARMUP_S, CPU_TRAINING_FLOPS, compile_decision
from minilm.config import Config, load_config
from minilm.flops import flops_per_token

CPU = torch.device("cpu")


def test_the_lesson_run_stays_eager_and_the_long_small_run_compiles():
    tiny, small = load_config("tiny", check_estimate=False), load_config("small", check_estimate=False)
    on, why = compile_decision(tiny, CPU, flops_per_token(tiny))
    assert not on and why.startswith("eager") and "warm-up" in why
    on, why = compile_decision(small, CPU, flops_per_token(small))
    assert on and why.startswith("torch.compile")


def test_break_even_is_where_the_saving_equals_the_warm_up():
    cfg = load_config("tiny", check_estimate=False)
    fpt = flops_per_token(cfg)
    steps = COMPILE_WARMUP_S / COMPILE_SAVING * CPU_TRAINING_FLOPS / (cfg.tokens_per_step * fpt)
    assert not compile_decision(cfg.replace(max_steps=int(steps)), CPU, fpt)[0]
    assert compile_decision(cfg.replace(max_steps=int(steps) + 1), CPU, fpt)[0]


def test_the_config_decides_elsewhere_and_compile_true_always_compiles():
    cfg = load_config("small", check_estimate=False)
    assert compile_decision(cfg, torch.device("cuda"), flops_per_token(cfg)) == (False, "compile: false in the config")
    tiny = load_config("tiny", check_estimate=False).replace(compile=True)
    assert compile_decision(tiny, CPU, flops_per_token(tiny))[0]


def test_a_checkpointing_model_compiles_on_a_cpu_and_keeps_eagers_gradients():
    """Gradient checkpointing at dropout 0 under the C++ wrapper failed inductor's compile (see compile_model)."""
    from minilm.compile_policy import compile_model
    from minilm.model import GPT

    cfg = Config(vocab_size=256, d_model=32, n_heads=2, n_layers=2, max_seq_len=32, gradient_checkpointing=True)
    torch.manual_seed(0)
    model = GPT(cfg.replace(dropout=0.0)).train()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for run in (model, compile_model(model, torch.device("cpu"))):
        model.zero_grad(set_to_none=True)
        run(x, x, return_logits=False)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
