"""Size selection: what fits, how long it trains, and the planner's fix for a config that does not fit."""

import math
import warnings
from pathlib import Path

import pytest

from minilm.config import Config, load_config
from minilm.counting import count_parameters
from minilm.flops import flops_per_token, tokens_per_second_at
from minilm.memory import GB, estimate_training_memory, trainer_step_memory
from minilm.sizing import (
    DESIGN_CLAIMS,
    Hardware,
    design_claims,
    design_claims_table,
    fits,
    largest_batch_that_fits,
    plan_to_fit,
    size_options,
    sizing_table,
    throughput,
    training_hours,
)

ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(ROOT / "configs" / "training" / f"{name}_model.json")


def test_usable_memory_and_fits():
    hw = Hardware(memory_gb=16)
    assert hw.usable_bytes == int((16 * 0.9 - 1.0) * GB)
    cfg = shipped("small")
    peak = trainer_step_memory(cfg).peak_bytes
    assert fits(cfg, hw) == (peak <= hw.usable_bytes)
    assert fits(cfg, Hardware(memory_gb=80)) and not fits(cfg.replace(batch_size=256), Hardware(memory_gb=8))


def test_planner_counts_the_trainers_chunked_loss_not_full_logits():
    # Memory between the trainer's estimate (chunked loss) and a plain loop's (full logits): the
    # trainer fits, so the planner must accept the config unchanged; counting full logits refused it.
    cfg = shipped("small")  # bf16, 16 x 1024, vocab 50,304: the full logits are gigabytes
    chunked, full = trainer_step_memory(cfg).peak_bytes, estimate_training_memory(cfg).peak_bytes
    assert full - chunked > 2 * GB
    hw = Hardware(memory_gb=(chunked + full) / 2 / GB, context_gb=0.0, headroom=0.0)
    assert chunked <= hw.usable_bytes < full
    assert fits(cfg, hw) and largest_batch_that_fits(cfg, hw) >= cfg.batch_size
    plan = plan_to_fit(cfg, hw)
    assert plan.original.fits and plan.best.changes == () and plan.best.peak_bytes == chunked
    # ... and a byte under the chunked estimate does not fit.
    assert not fits(cfg, Hardware(memory_gb=(chunked - 1) / GB, context_gb=0.0, headroom=0.0))


def test_planner_makes_an_oversized_config_fit_and_keeps_the_effective_batch():
    cfg = shipped("base").replace(batch_size=64, bf16=False)  # 64 x 1024 tokens in fp32: ~39 GiB (chunked loss)
    hw = Hardware(memory_gb=16)
    assert not fits(cfg, hw)
    plan = plan_to_fit(cfg, hw)
    assert not plan.original.fits and plan.best is not None and plan.best.fits
    best = plan.best
    assert best.peak_bytes <= hw.usable_bytes
    assert best.peak_bytes == trainer_step_memory(best.config).peak_bytes  # reported memory is the estimate's
    assert best.effective_batch == cfg.batch_size * cfg.grad_accumulation_steps  # same optimisation
    assert best.config.n_layers == cfg.n_layers and not best.changes_model
    # Each single change is listed with its own memory, all below the original's.
    assert {"gradient checkpointing", "bf16 autocast"} <= {s.changes[0] for s in plan.options}
    assert all(s.peak_bytes < plan.original.peak_bytes for s in plan.options)
    assert "cheapest that fits" in plan.table() and plan.table("markdown").startswith("| change |")


def test_planner_picks_the_cheapest_fitting_combination():
    cfg = shipped("base").replace(batch_size=64, bf16=False)
    plan = plan_to_fit(cfg, 16)
    best = plan.best
    # No fitting option that keeps the model may add less compute, or as little with fewer halvings.
    assert best.compute_factor == 1.0  # checkpointing was not needed
    halvings = round(math.log2(cfg.batch_size // best.config.batch_size))
    if halvings:  # one halving fewer does not fit with the same other changes
        fewer = best.config.replace(
            batch_size=best.config.batch_size * 2, grad_accumulation_steps=best.config.grad_accumulation_steps // 2
        )
        assert not fits(fewer, Hardware(memory_gb=16))


def test_a_config_that_already_fits_needs_no_change():
    plan = plan_to_fit(shipped("small"), Hardware(memory_gb=80))
    assert plan.original.fits and plan.best.changes == () and plan.best.config == plan.original.config


def test_checkpointing_is_chosen_when_halving_is_not_enough():
    # Batch 1 cannot be halved: only checkpointing (and precision) are left.
    cfg = shipped("base").replace(batch_size=1, grad_accumulation_steps=1, bf16=True, max_seq_len=4096)
    checkpointed = trainer_step_memory(cfg.replace(gradient_checkpointing=True)).peak_bytes
    between = (checkpointed + trainer_step_memory(cfg).peak_bytes) / 2 / GB  # usable memory to aim for
    hw = Hardware(memory_gb=float((between + 1) / 0.9))  # 10% headroom and 1 GB for the CUDA context
    assert not fits(cfg, hw)
    plan = plan_to_fit(cfg, hw)
    assert plan.best is not None and plan.best.config.gradient_checkpointing
    assert plan.best.compute_factor > 1.1  # it costs a recomputed forward


def test_smaller_model_as_a_last_resort():
    cfg = shipped("large").replace(world_size=1)  # bf16, checkpointing, 8 x 1024
    plan = plan_to_fit(cfg, Hardware(memory_gb=8))
    best = plan.best
    assert best is not None and best.fits and best.changes_model
    assert best.config.n_layers < cfg.n_layers and best.changes[0].startswith("smaller model")
    assert count_parameters(best.config).total < count_parameters(cfg).total
    assert plan.notes
    assert plan_to_fit(cfg, Hardware(memory_gb=8), allow_smaller_model=False).best is None
    assert plan_to_fit(cfg, Hardware(memory_gb=1.0)).best is None  # nothing fits in 1 GB minus the context


def test_fp16_where_the_gpu_has_no_bf16():
    cfg = shipped("small").replace(bf16=False, batch_size=32)
    plan = plan_to_fit(cfg, Hardware.from_accelerator("T4"))
    assert any("fp16" in s.changes[0] for s in plan.options)
    assert not any("bf16" in c for s in plan.options for c in s.changes)


def test_largest_batch_that_fits():
    cfg, hw = shipped("small"), Hardware(memory_gb=8)
    b = largest_batch_that_fits(cfg, hw)
    assert b > 0 and fits(cfg.replace(batch_size=b), hw) and not fits(cfg.replace(batch_size=b + 1), hw)
    assert largest_batch_that_fits(shipped("large"), Hardware(memory_gb=1.0)) == 0


def test_throughput_and_time():
    cfg = shipped("small")
    measured = Hardware(memory_gb=24, n_devices=2, tokens_per_second=50_000)
    assert throughput(cfg, measured) == 100_000
    assert training_hours(cfg, 3.6e9, measured) == pytest.approx(10.0)
    hw = Hardware.from_accelerator("A100 80GB", mfu=0.5)
    assert throughput(cfg, hw) == pytest.approx(tokens_per_second_at(cfg, "A100 80GB", 0.5))
    assert throughput(cfg, hw) == pytest.approx(312e12 * 0.5 / flops_per_token(cfg))  # bf16 config, no checkpointing
    with pytest.raises(ValueError):
        throughput(cfg, Hardware(memory_gb=24))


def test_size_options_and_chinchilla():
    configs = {name: shipped(name) for name in ("tiny", "small", "base", "large")}
    hw = Hardware.from_accelerator("RTX 4090")
    options = size_options(configs, hw, hours=24, target_tokens=1e9)
    assert [o.name for o in options] == list(configs)
    for o in options:
        n = count_parameters(o.config).total
        assert o.n_parameters == n and o.chinchilla_tokens == 20 * n
        assert o.hours_to_chinchilla == pytest.approx(20 * n / o.tokens_per_second / 3600)
        assert o.tokens_in_budget == pytest.approx(24 * 3600 * o.tokens_per_second)
        assert o.fits == (o.peak_bytes <= hw.usable_bytes)
    assert options[0].chinchilla_in_budget and not options[-1].chinchilla_in_budget  # tiny yes, large no
    table = sizing_table(options)
    assert all(name in table for name in configs) and "time to target" in table
    assert sizing_table(options, "markdown").startswith("| config |")


def test_design_claims_table():
    checks = design_claims()
    assert [c.name for c in checks] == ["small", "base", "large"]
    for c in checks:
        cfg = shipped(c.name)
        assert c.n_parameters == count_parameters(cfg).total
        assert c.design_label == DESIGN_CLAIMS[c.name]["label"]
        assert c.peak_bytes == trainer_step_memory(cfg).peak_bytes
        gpu = Hardware(memory_gb=c.recommended_gpu_gb, n_devices=cfg.world_size)
        assert c.fits_recommended == fits(cfg, gpu)
        assert c.tokens_per_second > 10 * c.claimed_tokens_per_s  # the design's speeds are far too low
    assert checks[0].tokens_per_second > 100 * checks[0].claimed_tokens_per_s  # small: hundreds of times
    table = design_claims_table()
    for label in ("124M", "355M", "1.3B", "8 GB", "16 GB", "24 GB"):
        assert label in table


def test_bf16_config_on_a_gpu_without_bf16_is_planned_in_fp16():
    """A T4 runs a bf16 config as fp16 (minilm.precision); sizing must price and plan it that way, not fail."""
    cfg = shipped("small")
    assert cfg.bf16
    t4 = Hardware.from_accelerator("T4")
    (option,) = size_options({"small": cfg}, t4)
    assert option.config.fp16 and not option.config.bf16
    assert option.tokens_per_second == pytest.approx(throughput(cfg.replace(bf16=False, fp16=True), t4))
    plan = plan_to_fit(cfg, t4)
    assert plan.original.config.fp16 and not plan.original.config.bf16
    assert any("no bf16" in n for n in plan.notes) and "no bf16" in plan.table()
    assert not any(n for n in plan_to_fit(cfg, Hardware.from_accelerator("A100 80GB")).notes)


def test_the_planner_chooses_by_its_levers_not_by_its_labels(monkeypatch):
    """Rewording every label changes no decision: plans compare typed levers, never words."""
    import minilm.sizing as sizing

    cfg = shipped("base").replace(batch_size=64, bf16=False)
    before = plan_to_fit(cfg, Hardware(memory_gb=16))
    monkeypatch.setattr(sizing, "_labels", lambda levers, cfg: tuple("lever" for _ in range(3)))
    after = plan_to_fit(cfg, Hardware(memory_gb=16))
    assert after.best.levers == before.best.levers and after.best.config == before.best.config
    assert [s.levers for s in after.options] == [s.levers for s in before.options] != []
    lv = before.best.levers
    assert before.best.config.batch_size == cfg.batch_size // 2**lv.halvings
    assert before.best.config.gradient_checkpointing == lv.checkpointing


# --- scaling: the Chinchilla fit and the compute-optimal size ---------------------------
from minilm.sizing import CHINCHILLA, ScalingLaw, budget_flops, rule_of_thumb_parameters  # noqa: E402


def _numeric_argmin_along_iso_flop(law: ScalingLaw, flops: float) -> float:
    """Minimise L(N, C/6N) over log N by golden-section search: no formula, only evaluations."""
    lo, hi = math.log(1e3), math.log(flops / 6 / 1e3)  # at least 1,000 parameters and 1,000 tokens
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if law.iso_flop_loss(flops, math.exp(a)) < law.iso_flop_loss(flops, math.exp(b)):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def test_chinchilla_constants_are_the_published_approach_3_fit():
    assert (CHINCHILLA.E, CHINCHILLA.A, CHINCHILLA.B, CHINCHILLA.alpha, CHINCHILLA.beta) == (
        1.69,
        406.4,
        410.7,
        0.34,
        0.28,
    )
    assert CHINCHILLA.loss(70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)


@pytest.mark.parametrize("flops", [1e15, 5.7e18, 1e21, 5.76e23])
def test_closed_form_optimum_equals_a_numeric_minimisation_along_the_iso_flop_line(flops):
    n_opt = CHINCHILLA.optimal_parameters(flops)
    assert n_opt == pytest.approx(_numeric_argmin_along_iso_flop(CHINCHILLA, flops), rel=1e-6)
    assert 6 * n_opt * CHINCHILLA.optimal_tokens(flops) == pytest.approx(flops)  # on the budget
    best = CHINCHILLA.optimal_loss(flops)
    for factor in (0.5, 0.9, 1.1, 2.0):  # any other size on the same budget does worse
        assert CHINCHILLA.iso_flop_loss(flops, n_opt * factor) > best


def test_closed_form_holds_for_another_law_and_scales_as_a_power_of_compute():
    law = ScalingLaw(E=1.0, A=100.0, B=1000.0, alpha=0.5, beta=0.25)
    assert law.optimal_parameters(1e20) == pytest.approx(_numeric_argmin_along_iso_flop(law, 1e20), rel=1e-6)
    # N_opt ∝ C**(beta/(alpha+beta)): 1000x the compute -> 1000**(1/3) = 10x the parameters
    assert law.optimal_parameters(1e21) / law.optimal_parameters(1e18) == pytest.approx(10.0)
    # more compute never predicts a higher best loss, and never below E
    losses = [CHINCHILLA.optimal_loss(c) for c in (1e17, 1e19, 1e21, 1e23)]
    assert losses == sorted(losses, reverse=True) and min(losses) > CHINCHILLA.E


def test_one_rtx_4090_day_is_compute_optimal_near_220m_by_the_rules_of_thumb():
    """docs/concepts/sizing.md: the day's FLOPs with D = 20N and C = 6ND give ~218M parameters."""
    hw = Hardware.from_accelerator("RTX 4090", mfu=0.4)
    flops = budget_flops(hw, hours=24)
    assert flops == pytest.approx(165.2e12 * 0.4 * 86400)
    n = rule_of_thumb_parameters(flops)
    assert 6 * n * 20 * n == pytest.approx(flops) and 210e6 < n < 225e6
    assert count_parameters(shipped("base")).total < n < count_parameters(shipped("large")).total
    assert budget_flops(Hardware.from_accelerator("T4", n_devices=4), 1) == pytest.approx(65e12 * 0.4 * 4 * 3600)
    with pytest.raises(ValueError, match="peak_flops"):
        budget_flops(Hardware(memory_gb=16), 1)
