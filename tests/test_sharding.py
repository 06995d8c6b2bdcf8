"""Per-rank memory under DDP, ZeRO-1, ZeRO-2 and ZeRO-3 (FSDP2): estimates against peaks measured on 2 CPU processes."""

import math

import pytest

from minilm.config import Config, load_config
from minilm.counting import count_parameters, parameter_shapes
from minilm.sharding import STRATEGIES, estimate_rank_memory, rank_memory_table, shard_units, zero1_partition

# Tiny shapes, so that model state is most of the peak and sharding shows: one tied model
# with even dimensions, one untied with odd ones (FSDP2 pads dim 0 to a multiple of W) and
# three blocks (the prefetch and the previous reduce-scatter buffer both in play).
SHAPES = {
    "tied d64 L2": Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=32, batch_size=2),
    "untied odd L3": Config(
        vocab_size=509, d_model=48, n_heads=4, n_layers=3, max_seq_len=31, batch_size=1, tie_embeddings=False, d_ff=100
    ),
}
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def measured():
    from minilm.measure_ranks import measure_rank_peaks

    return measure_rank_peaks(SHAPES, STRATEGIES, world_size=2)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_estimate_within_5_percent_of_each_ranks_measured_peak(measured, shape, strategy):
    for rank, peak in enumerate(measured[shape][strategy]):
        est = estimate_rank_memory(SHAPES[shape], strategy, 2, device_type="cpu", rank=rank).peak_bytes
        err = est / peak - 1
        assert abs(err) < TOLERANCE, f"{shape} {strategy} rank {rank}: estimated {est}, measured {peak} ({err:+.2%})"


def test_sharding_lowers_the_measured_peak(measured):
    for shape in SHAPES:
        m = {s: max(p) for s, p in measured[shape].items()}
        assert m["zero3"] < m["zero2"] < m["zero1"] < m["ddp"], (shape, m)


def test_zero1_saves_exactly_the_other_ranks_adamw_state(measured):
    # ZeRO-1 is DDP with a sharded optimizer: the measured drop on each rank is 8 bytes for every
    # parameter the other rank steps (AdamW's two fp32 moments), counted from the partition.
    for shape, cfg in SHAPES.items():
        share = [sum(map(sum, groups)) for groups in zero1_partition(cfg, 2)]
        for rank in range(2):
            saved = measured[shape]["ddp"][rank] - measured[shape]["zero1"][rank]
            assert saved == pytest.approx(8 * share[1 - rank], rel=0.01), (shape, rank, saved, share)


def test_zero1_partition_is_torchs_greedy_one():
    cfg = SHAPES["untied odd L3"]
    share = zero1_partition(cfg, 3)
    numels = sorted(n for groups in share for g in groups for n in g)
    assert numels == sorted(math.prod(s) for _, s in parameter_shapes(cfg))  # every tensor once, whole
    # largest first: the two 509x48 tables go to ranks 0 and 1, the next matrix (qkv, 144x48) to rank 2
    assert [groups[0][0] for groups in share] == [509 * 48, 509 * 48, 144 * 48]
    totals = [sum(map(sum, groups)) for groups in share]
    assert max(totals) - min(totals) <= 509 * 48  # greedy: never more than one tensor apart
    assert estimate_rank_memory(cfg, "zero1", 3).estimate.optimizer_state == 8 * max(totals)


def test_units_cover_every_parameter_and_pad_dim0():
    cfg = SHAPES["untied odd L3"]
    units = shard_units(cfg, 2)
    assert [u.name for u in units] == ["root", "blocks.0", "blocks.1", "blocks.2"]
    assert sum(u.numel for u in units) == count_parameters(cfg).total
    root = units[0]
    # 509 token rows and 509 head rows pad to 255 each; 31 positions to 16; ln_f's 48 split evenly
    assert root.shard_numel == (255 + 255 + 16) * 48 + 2 * 24


def test_model_state_per_rank_shrinks_as_the_strategies_say():
    cfg = load_config("large")
    n = count_parameters(cfg).total
    state = {s: estimate_rank_memory(cfg, s, 8).model_state_bytes for s in STRATEGIES}
    assert state["ddp"] == 16 * n
    busiest = max(sum(map(sum, groups)) for groups in zero1_partition(cfg, 8))
    assert state["zero1"] == 8 * n + 8 * busiest  # AdamW's state for whole tensors: about 1/8 of them
    assert n / 8 <= busiest <= n / 8 + max(math.prod(s) for _, s in parameter_shapes(cfg))
    assert state["zero3"] == pytest.approx(16 * n / 8, rel=1e-3)  # padding only
    peaks = [estimate_rank_memory(cfg, s, 8).peak_bytes for s in STRATEGIES]
    assert peaks == sorted(peaks, reverse=True), peaks


def test_one_rank_fsdp_holds_what_one_gpu_holds_plus_the_gathered_copy():
    cfg = SHAPES["tied d64 L2"]
    one = estimate_rank_memory(cfg, "ddp", 1, device_type="cpu")
    z3 = estimate_rank_memory(cfg, "zero3", 1, device_type="cpu")
    assert z3.model_state_bytes == one.model_state_bytes
    assert z3.peak_bytes > one.peak_bytes  # the gathered units are copies of the (unsharded) shards


def test_errors_and_table():
    with pytest.raises(ValueError, match="strategy"):
        estimate_rank_memory(SHAPES["tied d64 L2"], "zero4", 2)
    with pytest.raises(ValueError, match="rank"):
        estimate_rank_memory(SHAPES["tied d64 L2"], "zero1", 2, rank=2)
    table = rank_memory_table(load_config("large"), (1, 8))
    assert "ZeRO-3" in table and table.count("\n") == 1 + len(STRATEGIES)


def test_planner_shards_a_model_that_fits_no_single_gpu():
    from minilm.sizing import Hardware, plan_to_fit

    cfg, hw = load_config("xl"), Hardware.from_accelerator("RTX 4090")
    plain = plan_to_fit(cfg, hw, allow_smaller_model=False)
    assert plain.best is None and "GPUs" not in plain.table()  # without shard_gpus: the plan as before
    plan = plan_to_fit(cfg, hw, allow_smaller_model=False, shard_gpus=(2, 4, 8))
    sharded = [s for s in plan.options if s.levers.fsdp_gpus]
    assert [s.n_gpus for s in sharded] == [2, 4, 8]
    for s in sharded:
        assert s.peak_bytes == estimate_rank_memory(s.config, "zero3", s.n_gpus).peak_bytes
        assert s.tokens_per_second > 0
    assert [s.peak_bytes for s in sharded] == sorted((s.peak_bytes for s in sharded), reverse=True)
    assert plan.best is not None and plan.best.levers.fsdp_gpus == min(s.n_gpus for s in sharded if s.fits)
    assert "per-GPU peak" in plan.table()
