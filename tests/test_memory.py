"""The closed-form training-memory estimate against the measured peak of real CPU training steps.

The measurement (minilm.measure) counts the bytes of live tensor storages after every
operator of a steady-state step (forward, loss, backward, clipping, AdamW), and is itself
checked against PyTorch's MemTracker. The estimate must be within 10% of it on the grid
the issue asks for: 3 shapes x batch 1/4 x sequence 64/256 x checkpointing off/on x
fp32/bf16 (48 steps), and on a set of other variants (manual attention, dropout,
accumulation, other optimizers, fp16, untied or bias-free models).

Shapes are tiny so the suite is fast, but chosen so that activations and logits are a
large part of the peak at batch 4 x 256, not a rounding error next to the weights.
"""

import pytest

from minilm.config import Config
from minilm.counting import count_parameters
from minilm.measure import (
    VALIDATION_GRID,
    VALIDATION_SHAPES,
    VALIDATION_VARIANTS,
    VARIANT_BASE,
    measure_training_step,
    measure_with_memtracker,
)
from minilm.memory import GB, NOT_COUNTED, estimate_training_memory, layer_activations

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 0.10


def compare(cfg: Config, **kw) -> tuple[float, float, int, int]:
    """(relative error of the peak, share of the peak that is not weights + Adam state, estimated, measured)."""
    measured = measure_training_step(cfg, **kw)
    est = estimate_training_memory(cfg, device_type="cpu", **kw)
    err = (est.peak_bytes - measured.peak_bytes) / measured.peak_bytes
    dynamic = (measured.peak_bytes - measured.start_bytes) / measured.peak_bytes
    return err, dynamic, est.peak_bytes, measured.peak_bytes


@pytest.mark.parametrize("chunked_loss", [False, True], ids=["full-logits", "chunked-loss"])
@pytest.mark.parametrize("shape", VALIDATION_SHAPES)
def test_estimate_within_10_percent_on_the_grid(shape, chunked_loss):
    rows, failures = [], []
    for b, s, ckpt, bf16 in VALIDATION_GRID:
        cfg = Config(**VALIDATION_SHAPES[shape], max_seq_len=s, batch_size=b, gradient_checkpointing=ckpt, bf16=bf16)
        err, dynamic, est, meas = compare(cfg, chunked_loss=chunked_loss)
        rows.append((b, s, ckpt, bf16, err, dynamic))
        if abs(err) > TOLERANCE:
            failures.append(f"b={b} s={s} ckpt={ckpt} bf16={bf16}: estimated {est:,} measured {meas:,} ({err:+.2%})")
    assert not failures, "\n".join(failures)
    # The grid is meaningful: at batch 4 x 256 most of the peak is activations, logits and gradients.
    big = [dyn for b, s, _, _, _, dyn in rows if b * s == 1024]
    assert min(big) > 0.4, big


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("variant", VALIDATION_VARIANTS)
def test_estimate_within_10_percent_on_variants(variant, optimizer):
    cfg = Config(**{**VARIANT_BASE, **VALIDATION_VARIANTS[variant]})
    err, _, est, meas = compare(cfg, optimizer=optimizer)
    assert abs(err) <= TOLERANCE, f"estimated {est:,} measured {meas:,} ({err:+.2%})"


@pytest.mark.parametrize("variant", VALIDATION_VARIANTS)
def test_chunked_loss_estimate_within_10_percent_on_variants(variant):
    cfg = Config(**{**VARIANT_BASE, **VALIDATION_VARIANTS[variant]})
    err, _, est, meas = compare(cfg, chunked_loss=True)
    assert abs(err) <= TOLERANCE, f"estimated {est:,} measured {meas:,} ({err:+.2%})"


def test_chunked_loss_never_holds_the_logits_and_is_counted_exactly(monkeypatch):
    # vocabulary 4096 at 1024 positions: the full-logits loss peaks at its 12·b·s·V bytes of fp32
    # tensors; the chunked loss (chunks of 64 positions here) holds one chunk, and the estimate
    # names each piece it holds.
    import minilm.loss
    from minilm.loss import chunk_rows

    monkeypatch.setattr(minilm.loss, "CHUNK_BYTES", 2**20)
    assert chunk_rows(4096) == 64
    cfg = Config(vocab_size=4096, d_model=64, n_heads=4, n_layers=2, max_seq_len=256, batch_size=4)
    full = measure_training_step(cfg)
    chunked = measure_training_step(cfg, chunked_loss=True)
    est = estimate_training_memory(cfg, device_type="cpu", chunked_loss=True)
    assert est.peak_moment == "chunked loss" and chunked.peak_at.startswith("forward")
    assert abs(est.peak_bytes - chunked.peak_bytes) <= 0.001 * chunked.peak_bytes
    assert chunked.peak_bytes < full.peak_bytes - 8 * 1024 * 4096  # at least two (b·s, V) fp32 tensors fewer
    assert est.at_peak()["one chunk of logits"] == 4 * 64 * 4096 + 4 * 64 * 64  # fp32 logits, the d h matmul
    with pytest.raises(ValueError, match="choose one"):
        estimate_training_memory(cfg, keep_logits=True, chunked_loss=True)


def test_keep_logits_costs_the_logits_through_backward():
    cfg = Config(vocab_size=1024, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, batch_size=4)
    err, _, est, meas = compare(cfg, keep_logits=True)
    assert abs(err) <= TOLERANCE
    plain = measure_training_step(cfg).peak_bytes
    assert meas - plain == 4 * 4 * 128 * 1024  # the fp32 logits, held by the caller at the peak
    assert est - estimate_training_memory(cfg, device_type="cpu").peak_bytes == meas - plain


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(bf16=True, gradient_checkpointing=True), dict(attention="manual", grad_accumulation_steps=2)],
    ids=["fp32", "bf16-ckpt", "manual-accum"],
)
def test_storage_tracker_agrees_with_pytorch_memtracker(changes):
    cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, batch_size=4, **changes)
    assert measure_training_step(cfg).peak_bytes == measure_with_memtracker(cfg)


def test_measurement_is_a_steady_state_step():
    cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, batch_size=4)
    m = measure_training_step(cfg, record=True)
    n = count_parameters(cfg).total
    # Before the step: fp32 weights + AdamW's two moments already exist (12 B/param), plus the batch
    # and AdamW's step counters.
    assert 12 * n <= m.start_bytes <= 12 * n + 4096 + 2 * 8 * 4 * 64
    assert set(m.phase_peak_bytes) == {"forward", "backward", "optimizer"}
    assert m.peak_bytes == max(m.phase_peak_bytes.values()) == max(live for _, _, live in m.timeline)
    # After zero_grad(set_to_none=True) the step ends where it started.
    assert m.timeline[-1][2] == m.start_bytes


def test_model_state_is_16_bytes_per_parameter_with_or_without_autocast():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8, batch_size=8)
    n = count_parameters(cfg).total
    fp32, bf16 = estimate_training_memory(cfg), estimate_training_memory(cfg.replace(bf16=True))
    assert fp32.model_state == bf16.model_state == 16 * n
    assert (fp32.parameters, fp32.gradients, fp32.optimizer_state) == (4 * n, 4 * n, 8 * n)
    assert bf16.layer.total < fp32.layer.total  # autocast saves activation memory, not model state


def test_activation_formulas():
    cfg = Config(vocab_size=1000, d_model=256, n_heads=8, n_layers=4, max_seq_len=512)
    b, s, d, a = 2, 512, 256, 8
    fp32 = layer_activations(cfg, b, s)
    # fp32, SDPA, no dropout: 16 numbers per token per layer, 4·a·s logsumexp, LayerNorm stats.
    assert fp32.total == 64 * b * s * d + 4 * a * b * s + 16 * b * s
    manual = layer_activations(cfg.replace(attention="manual"), b, s)
    assert manual.total - fp32.total == 4 * a * b * s * s + s * s - 4 * a * b * s  # the s² probabilities
    bf16 = layer_activations(cfg.replace(bf16=True), b, s)
    assert 0.5 < (bf16.total - bf16.weight_copies) / fp32.total < 0.65  # residual stream and stats stay fp32
    est = estimate_training_memory(cfg.replace(batch_size=b))
    assert est.logits == 4 * b * s * 1000 and est.logits_transient == 2 * est.logits
    ckpt = estimate_training_memory(cfg.replace(batch_size=b, gradient_checkpointing=True))
    assert ckpt.saved_activations < est.saved_activations and ckpt.recompute > 0


def test_logits_are_a_large_share_at_gpt2_small():
    # ESTIMATION.md's measured check: at GPT-2 small, b=8, s=1024 the logits tensors are ~44% of the peak.
    cfg = Config(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024, batch_size=8)
    est = estimate_training_memory(cfg, device_type="cpu", optimizer="for-loop")
    assert est.peak_moment == "loss backward"
    logits = sum(v for k, v in est.at_peak().items() if k.startswith("logits"))
    assert 0.35 < logits / est.peak_bytes < 0.5


def test_ddp_buckets_and_bucket_view():
    cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, world_size=2)
    n = count_parameters(cfg).total
    assert estimate_training_memory(cfg).ddp_buckets == 4 * n
    assert estimate_training_memory(cfg, gradient_as_bucket_view=True).ddp_buckets == 0
    assert estimate_training_memory(cfg.replace(world_size=1)).ddp_buckets == 0


def test_breakdown_is_consistent_and_printable():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8, batch_size=16, bf16=True)
    est = estimate_training_memory(cfg)
    assert est.peak_bytes == sum(est.at_peak().values()) == max(sum(m.values()) for m in est.moments.values())
    assert est.peak_gb == est.peak_bytes / GB
    text = est.table()
    assert f"peak at: {est.peak_moment}" in text and all(name in text for name in est.moments)
    assert est.table("markdown").startswith("**batch 16 x seq 1024")
    with pytest.raises(ValueError):
        est.table("html")
    with pytest.raises(ValueError):
        estimate_training_memory(cfg, optimizer="sgd")


def test_not_counted_says_why_nvidia_smi_shows_more():
    for phrase in ("CUDA context", "fragmentation", "cuBLAS", "NCCL", "nvidia-smi", "max_memory_allocated"):
        assert phrase in NOT_COUNTED


def test_cuda_estimate_counts_two_cublas_workspaces(monkeypatch):
    """PyTorch allocates one cuBLAS workspace per (handle, stream); forward and backward run on
    two threads, so two. This was the ~65 MiB that max_memory_allocated showed above the estimate."""
    from minilm.memory import MIB, cublas_workspace_bytes

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes((9, 0)) == 2 * 32 * MIB  # Hopper
    assert cublas_workspace_bytes((8, 0)) == 2 * (8 * MIB + 128 * 1024)  # Ampere and others
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the documented deterministic setting
    assert cublas_workspace_bytes((9, 0)) == 2 * 4096 * 1024 * 8
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cfg = Config(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, batch_size=2)
    gpu, cpu = estimate_training_memory(cfg, device_type="cuda"), estimate_training_memory(cfg, device_type="cpu")
    assert cpu.workspaces == 0 and gpu.workspaces == cublas_workspace_bytes()
    assert all(moment["cuBLAS workspaces"] == gpu.workspaces for moment in gpu.moments.values())


def test_trainer_step_memory_is_the_chunked_loss_and_says_so():
    """The one rule the planner, sharding, editor and memory check use: the trainer's chunked loss."""
    from minilm.config import load_config
    from minilm.memory import trainer_step_memory

    small = load_config("small")
    trainer = trainer_step_memory(small)
    assert trainer == estimate_training_memory(small, chunked_loss=True)
    assert "chunked loss" in trainer.moments and trainer.logits == 0
    # The default of the formula lesson 05 teaches stays full logits, gigabytes more at 16 x 1024.
    assert estimate_training_memory(small).peak_bytes - trainer.peak_bytes > 2 * GB
    assert trainer_step_memory(small, batch_size=2, device_type="cpu") == estimate_training_memory(
        small, batch_size=2, device_type="cpu", chunked_loss=True
    )
    for full in ({"keep_logits": True}, {"chunked_loss": False}):
        with pytest.raises(ValueError, match="chunked"):
            trainer_step_memory(small, **full)


def test_compiled_cpu_bf16_step_adds_attentions_backward_working_set():
    """A compiled CPU bf16 step at short sequences runs attention's backward as matmuls (minilm.attention),
    holding S, dP (fp32) and P, dS (bf16) at once: the estimate adds 12 bytes per score there, nowhere else."""
    from minilm.attention import COMPILED_MATMUL_BACKWARD_MAX_T
    from minilm.memory import block_backward_extra, compiled_attention_backward_bytes

    cfg = Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, bf16=True, attention="sdpa")
    b, s, a = 8, 128, 4
    term = compiled_attention_backward_bytes(cfg, b, s, "cpu")
    assert term == 12 * a * b * s * s + 4 * a * b * s
    assert compiled_attention_backward_bytes(cfg, b, COMPILED_MATMUL_BACKWARD_MAX_T + 1, "cpu") == 0
    assert compiled_attention_backward_bytes(cfg, b, s, "cuda") == 0
    assert compiled_attention_backward_bytes(cfg.replace(bf16=False), b, s, "cpu") == 0
    assert compiled_attention_backward_bytes(cfg.replace(dropout=0.1), b, s, "cpu") == 0
    eager = estimate_training_memory(cfg, batch_size=b, device_type="cpu", chunked_loss=True)
    compiled = estimate_training_memory(cfg, batch_size=b, device_type="cpu", chunked_loss=True, compiled=True)
    assert block_backward_extra(cfg, b, s, "cpu", compiled=True) > block_backward_extra(cfg, b, s, "cpu")
    moment = "last block backward"
    extra = compiled.moments[moment]["backward temporaries"] - eager.moments[moment]["backward temporaries"]
    assert 0 < extra <= term and compiled.peak_bytes >= eager.peak_bytes
    cuda = dict(batch_size=b, device_type="cuda", chunked_loss=True)
    assert estimate_training_memory(cfg, compiled=True, **cuda) == estimate_training_memory(cfg, **cuda)


def _eager_step_both_ways(cfg):
    """(LiveStorageTracker's measurement, the CPU allocator's) of one eager step."""
    tracked = measure_training_step(cfg, chunked_loss=True)
    return tracked, measure_training_step(cfg, chunked_loss=True, instrument="allocator")


@pytest.mark.parametrize("b,s", [(4, 256), (1, 256), (4, 64)])
def test_the_allocators_records_agree_with_the_storage_tracker_on_fp32_eager_steps(b, s):
    """Two instruments, one built on the dispatcher, one on the CPU allocator: the same peaks, phase by phase."""
    cfg = Config(**VALIDATION_SHAPES["d128-L3-V1024"], max_seq_len=s, batch_size=b)
    tracked, allocated = _eager_step_both_ways(cfg)
    assert allocated.start_bytes == tracked.start_bytes
    assert allocated.peak_bytes == tracked.peak_bytes
    assert allocated.phase_peak_bytes == tracked.phase_peak_bytes


def test_at_1x64_a_dispatch_mode_itself_raises_the_backward_peak_to_the_trackers():
    """The one fp32 size where the instruments differ: the tracker is a TorchDispatchMode, and any such mode,
    even one that only passes operators through, makes the step's backward peak higher (apparently autograd
    then sums the tied embedding's two gradients into a new tensor instead of in place: three (V, C) tensors
    are live at the tracker's peak). The allocator's records show it; the tracker measures the step it sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    cfg = Config(**VALIDATION_SHAPES["d128-L3-V1024"], max_seq_len=64, batch_size=1)
    tracked, plain = _eager_step_both_ways(cfg)
    with PassThrough():
        observed = measure_training_step(cfg, chunked_loss=True, instrument="allocator")
    assert plain.peak_bytes < tracked.peak_bytes == observed.peak_bytes
    assert plain.phase_peak_bytes["forward"] == tracked.phase_peak_bytes["forward"]


def test_the_allocators_records_also_see_operators_inner_buffers_in_bf16():
    """In bf16, buffers allocated inside operators (never returned) raise the peak: only the allocator sees them."""
    cfg = Config(**VALIDATION_SHAPES["d128-L3-V1024"], max_seq_len=256, batch_size=4, bf16=True)
    tracked, allocated = _eager_step_both_ways(cfg)
    assert allocated.peak_bytes > tracked.peak_bytes


@pytest.mark.parametrize(
    "b,s,bf16,ckpt",
    [(4, 256, True, False), (4, 64, True, False), (4, 256, False, False), (4, 256, True, True)],
    ids=str,
)
def test_compiled_estimate_never_low_by_more_than_10_percent_nor_high_by_more_than_20(b, s, bf16, ckpt):
    """torch.compile's step (minilm.compile_policy.compile_model), measured by the CPU allocator's records.

    The compiled estimate is the eager one plus attention's working set: inductor's buffer reuse,
    which lowers the compiled peak, is not modelled, so it may err high (safe for the memory check).
    Among these cases: 4 x 64 in bf16 is the grid's highest (+15.5%), 4 x 256 in fp32 its lowest (-7.1%).
    """
    cfg = Config(
        **VALIDATION_SHAPES["d128-L3-V1024"], max_seq_len=s, batch_size=b, bf16=bf16, gradient_checkpointing=ckpt
    )
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # earlier tests' compiles count towards dynamo's recompile limit (then it runs eagerly)
    counters.clear()
    measured = measure_training_step(cfg, chunked_loss=True, compiled=True)
    assert measured.method.startswith("torch.profiler") and counters["stats"]["unique_graphs"] == 1  # compiled, whole
    est = estimate_training_memory(cfg, device_type="cpu", chunked_loss=True, compiled=True)
    err = (est.peak_bytes - measured.peak_bytes) / measured.peak_bytes
    assert -TOLERANCE <= err <= 2 * TOLERANCE, (
        f"estimated {est.peak_bytes:,} measured {measured.peak_bytes:,} ({err:+.2%})"
    )


def test_instrument_is_checked_and_the_tracker_refuses_a_compiled_step():
    cfg = Config(**VARIANT_BASE)
    with pytest.raises(ValueError, match="'tracker' or 'allocator'"):
        measure_training_step(cfg, instrument="ruler")
    with pytest.raises(ValueError, match="cannot see a compiled step"):
        measure_training_step(cfg, compiled=True, instrument="tracker")
    with pytest.raises(ValueError, match="record=True"):
        measure_training_step(cfg, instrument="allocator", record=True)
