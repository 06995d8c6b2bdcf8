"""The trainer: exact resume, gradient checkpointing, accumulation, bf16, non-finite stop, schedule, signals.

Micro models (d_model 32, 2 layers, 16-token sequences) on a 40k-character slice of the
bundled Shakespeare, so every test takes seconds on two CPU cores.
"""

import math
import os
import signal

import pytest
import torch

from minilm import Config
from minilm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from minilm.optim import lr_at, make_optimizer
from minilm.trainer import NOT_CONVERGING_ADVICE, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def micro(micro_config):
    """``micro(output_dir, **changes)``: the shared micro config (conftest.py) on this file's schedule."""
    schedule = dict(dropout=0.1, max_steps=8, warmup_steps=2, eval_steps=4, save_steps=4, save_total_limit=0)
    return lambda out, **changes: micro_config(out, **{**schedule, **changes})


def run(cfg, **kwargs):
    return Trainer(cfg, progress=False, verbose=False, sample_tokens=0, **kwargs)


def train_losses(result):
    return {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}


def grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()}


# ---------------------------------------------------------------------------------------
def test_schedule_shape():
    cfg = Config(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=100)
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps)]
    assert lrs[0] == pytest.approx(1e-4)  # warmup starts above zero ...
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # ... climbs linearly ...
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)  # ... to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only decays
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and min(lrs) >= 1e-4  # to learning_rate * min_lr_ratio
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # cosine: halfway is the mean
    assert lr_at(0, cfg.replace(warmup_steps=0)) == pytest.approx(1e-3)


def test_weight_decay_groups(micro, tmp_path, capsys):
    from minilm.counting import decay_split
    from minilm.model import GPT

    cfg = micro(tmp_path)
    opt = make_optimizer(GPT(cfg), cfg)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == cfg.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    counts = (sum(p.numel() for p in decayed["params"]), sum(p.numel() for p in plain["params"]))
    assert counts == decay_split(cfg)
    assert f"({counts[0]:,} parameters)" in capsys.readouterr().out


def test_exact_resume_bit_for_bit(micro, tmp_path):
    """Interrupted at step 5 and resumed (from checkpoint-4 or -5) == uninterrupted, bit for bit."""
    full = run(micro(tmp_path / "full")).train()
    assert full.status == "completed" and full.step == 8
    expected = train_losses(full)

    stopper = run(micro(tmp_path / "cut"))
    stopper.add_callback("on_step_end", lambda tr, rec: rec["step"] == 5 and tr.request_stop("test"))
    cut = stopper.train()
    assert cut.status == "interrupted" and cut.step == 5 and cut.checkpoint.name == "checkpoint-5"
    assert train_losses(cut) == {s: expected[s] for s in range(1, 6)}

    for start in (5, 4):
        resumed = run(micro(tmp_path / "cut"), resume_from_checkpoint=tmp_path / "cut" / f"checkpoint-{start}")
        assert resumed.step == start
        result = resumed.train()
        assert train_losses(result) == expected  # history continues; floats compared exactly
        assert result.val_loss == full.val_loss
    final, final_full = load_checkpoint(tmp_path / "cut" / "checkpoint-8"), load_checkpoint(full.checkpoint)
    for k, v in final_full.model_state.items():
        assert torch.equal(final.model_state[k], v), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 2  # steps 6..8 replaced, not appended twice: 8 train + 2 eval records


def test_gradient_checkpointing_same_gradients(micro, tmp_path):
    a = run(micro(tmp_path / "a"))
    b = run(micro(tmp_path / "b", gradient_checkpointing=True))
    assert b.raw_model.gradient_checkpointing and not a.raw_model.gradient_checkpointing
    batches = a.next_micro_batches()
    torch.manual_seed(0)  # same dropout masks in both (checkpointing replays the RNG on recompute)
    loss_a = a.compute_gradients(batches)
    torch.manual_seed(0)
    loss_b = b.compute_gradients(batches)
    assert torch.equal(loss_a, loss_b)
    ga, gb = grads(a), grads(b)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=name)


def test_accumulation_equals_one_big_batch(micro, tmp_path):
    """4 micro-batches of 2 sequences == 1 batch of 8: same sequences, same gradient."""
    acc = run(micro(tmp_path / "acc", dropout=0.0, batch_size=2, grad_accumulation_steps=4))
    big = run(micro(tmp_path / "big", dropout=0.0, batch_size=8, grad_accumulation_steps=1))
    micro_batches, (one,) = acc.next_micro_batches(), big.next_micro_batches()
    assert len(micro_batches) == 4
    assert torch.equal(torch.cat([x for x, _ in micro_batches]), one[0])
    loss_acc, loss_big = acc.compute_gradients(micro_batches), big.compute_gradients([one])
    torch.testing.assert_close(loss_acc, loss_big)
    ga, gb = grads(acc), grads(big)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_run(micro, tmp_path):
    fp32 = run(micro(tmp_path / "fp32", dropout=0.0)).train()
    # cpu_bf16=True: bf16 autocast even where this CPU would emulate it (it would then pick fp32)
    trainer = run(micro(tmp_path / "bf16", dropout=0.0, bf16=True), cpu_bf16=True)
    seen = []
    # (the LM head runs inside the chunked loss, minilm.loss, not as a module call: watch the MLP)
    trainer.raw_model.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = trainer.train()
    assert torch.bfloat16 in seen  # the matmuls ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # ... the weights stay fp32
    assert result.status == "completed" and math.isfinite(result.val_loss)
    bf, fp = train_losses(result), train_losses(fp32)
    assert bf[8] < bf[1]
    assert all(abs(bf[s] - fp[s]) < 0.05 for s in fp)  # the loss curve tracks fp32


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_follows_native_support(micro, tmp_path, monkeypatch, native):
    """Left to itself, the trainer runs bf16 on a CPU only where the CPU multiplies bf16 natively."""
    import minilm.precision

    monkeypatch.setattr(minilm.precision, "cpu_supports_bf16", lambda: native)
    trainer = run(micro(tmp_path, bf16=True, max_steps=1, warmup_steps=1))
    seen = []
    # (the LM head runs inside the chunked loss, minilm.loss, not as a module call: watch the MLP)
    trainer.raw_model.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    assert set(seen) == ({torch.bfloat16} if native else {torch.float32})
    assert trainer.precision_name == (
        "bf16 autocast"
        if native
        else "fp32 (bf16 requested, but this CPU has no native bf16 matmul: fp32 is faster here)"
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro, tmp_path, capsys):
    cfg = micro(tmp_path, save_steps=2, max_steps=10)
    trainer = Trainer(cfg, progress=False, sample_tokens=0)

    def poison(tr, rec):  # after step 5 (not a save step), break the weights
        if rec["step"] == 5:
            with torch.no_grad():
                tr.raw_model.wte.weight.fill_(float("nan"))

    trainer.add_callback("on_step_end", poison)
    result = trainer.train()
    assert result.status == "non_finite" and result.step == 5
    assert "non-finite loss (nan) at step 5" in result.message and NOT_CONVERGING_ADVICE in result.message
    assert "halve the learning rate" in capsys.readouterr().out
    assert result.checkpoint == tmp_path / "checkpoint-4"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    good = load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in good.model_state.values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_stops(micro, tmp_path, sig):
    trainer = run(micro(tmp_path, max_steps=50))
    trainer.add_callback("on_step_end", lambda tr, rec: rec["step"] == 3 and os.kill(os.getpid(), sig))
    result = trainer.train()
    assert result.status == "interrupted" and result.step == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_keyboard_interrupt_mid_step_saves_the_last_step_boundary(micro, tmp_path):
    """A KeyboardInterrupt in the middle of a step (a notebook's stop button) saves the state before it."""
    full = run(micro(tmp_path / "full")).train()
    trainer = run(micro(tmp_path / "kb"), handle_signals=False)
    original = trainer.compute_gradients

    def interrupted(batches):
        if trainer.step == 3:
            original(batches)  # consumes data and dropout randomness, then the user interrupts
            raise KeyboardInterrupt
        return original(batches)

    trainer.compute_gradients = interrupted
    assert trainer.train().status == "interrupted"
    resumed = run(micro(tmp_path / "kb"), resume_from_checkpoint=tmp_path / "kb" / "checkpoint-3")
    assert train_losses(resumed.train()) == train_losses(full)


def test_metrics_callbacks_and_sample(micro, tmp_path):
    events = []
    trainer = Trainer(
        micro(tmp_path, max_steps=4, eval_steps=2),
        progress=False,
        verbose=False,
        sample_tokens=20,
        callbacks={"on_eval": lambda tr, rec: events.append(("eval", rec["step"]))},
    )
    trainer.add_callback("on_checkpoint", lambda tr, rec: events.append(("ckpt", rec["step"])))
    result = trainer.train()
    assert events == [("eval", 2), ("eval", 4), ("ckpt", 4)]
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    assert result.unigram_loss > 0 and len(result.losses) == 4
    assert isinstance(result.sample, str) and len(result.sample) == 21  # newline prompt + 20 characters
    kinds = [line.split('"kind": "')[1][:4] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["trai", "trai", "eval", "trai", "trai", "eval"]


def test_fp16_autocast_with_gradient_scaler(micro, tmp_path, monkeypatch):
    """The fp16 path (autocast float16 + GradScaler) as a GPU runs it; torch's CPU autocast supports fp16 too.

    minilm.precision runs bf16 for fp16 on a CPU (faster, no scaler needed), so force float16 here.
    """
    import minilm.precision
    import minilm.trainer

    for module in (minilm.precision, minilm.trainer):
        monkeypatch.setattr(module, "autocast_dtype", lambda cfg, device, cpu_bf16=None: torch.float16)
    trainer = run(micro(tmp_path, fp16=True, dropout=0.0))
    assert trainer.scaler.is_enabled() and "gradient scaler" in trainer.precision_name
    seen = []
    # (the LM head runs inside the chunked loss, minilm.loss, not as a module call: watch the MLP)
    trainer.raw_model.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = trainer.train()
    assert torch.float16 in seen and result.status == "completed" and math.isfinite(result.val_loss)
    assert train_losses(result)[8] < train_losses(result)[1]
    scale = load_checkpoint(result.checkpoint).training_state["scaler"]["scale"]
    assert scale == trainer.scaler.get_scale() > 0  # the scaler's state travels with the checkpoint


def test_compile_option_saves_plain_keys(micro, tmp_path, monkeypatch):
    """compile=True trains the torch.compile'd model; checkpoints still hold the plain keys (no _orig_mod.)."""
    import functools

    import minilm.trainer

    # The 'eager' backend runs the captured graph without generating C++: the wiring, in seconds.
    monkeypatch.setattr(minilm.trainer.torch, "compile", functools.partial(torch.compile, backend="eager"))
    trainer = run(micro(tmp_path, compile=True, max_steps=4))
    assert trainer.model is not trainer.raw_model and hasattr(trainer.model, "_orig_mod")
    result = trainer.train()
    keys = load_checkpoint(result.checkpoint).model_state.keys()
    assert keys == trainer.raw_model.state_dict().keys() and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize(
    "gpu, name",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", None),  # not L4: measured on the spot instead
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB"),
        # Variants with other peaks than the entry of the same model: None, so the trainer measures instead.
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("Tesla V100-PCIE-32GB", None),
        ("Tesla V100S-PCIE-32GB", None),
        ("NVIDIA GeForce RTX 4090 D", None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),  # a MIG slice has a fraction of the card's peak
    ],
)
def test_gpu_names_map_to_datasheet_peaks(gpu, name):
    from minilm.hardware import datasheet_name

    assert datasheet_name(gpu) == name


def test_mfu_is_reported_where_a_peak_is_known(micro, tmp_path, monkeypatch, capsys):
    """On a GPU the loop logs MFU each step; faked here with a 1 TFLOP/s 'device' on the CPU."""
    import minilm.trainer

    monkeypatch.setattr(minilm.trainer, "device_peak_flops", lambda device, dtype: (1e12, "test peak"))
    trainer = Trainer(micro(tmp_path, max_steps=2), progress=False, sample_tokens=0)
    result = trainer.train()
    rec = result.history[0]
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * trainer.flops_per_token / 1e12)
    assert result.mfu == pytest.approx(result.tokens_per_s * trainer.flops_per_token / 1e12)
    assert "of the test peak" in capsys.readouterr().out


@pytest.mark.parametrize("limit, kept", [(1, [3]), (2, [2, 3])])
def test_resume_rotation_keeps_the_new_checkpoint_and_drops_the_replaced_run(micro, tmp_path, limit, kept):
    """Resumed from checkpoint-2 of a run that reached 8: checkpoints 4..8 belong to the replaced run, so
    rotation deletes them first and never the checkpoint just written; `latest` is then the new one."""
    run(micro(tmp_path, save_steps=2)).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    resumed = run(
        micro(tmp_path, save_steps=2, save_total_limit=limit), resume_from_checkpoint=tmp_path / "checkpoint-2"
    )
    resumed.add_callback("on_step_end", lambda tr, rec: rec["step"] == 3 and tr.request_stop("test"))
    assert resumed.train().step == 3
    assert list_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{s}" for s in kept]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_data_workers_change_nothing_and_resume_exactly(micro, tmp_path):
    """num_workers=2 gives the losses of num_workers=0, and resumes exactly, with dropout on (micro's 0.1).

    Starting a DataLoader draws its workers' base seed from the generator it is given; from torch's
    global one, which also draws the dropout masks, that would shift every mask after it.
    """
    expected = train_losses(run(micro(tmp_path / "w0")).train())
    cfg = micro(tmp_path / "w2", num_workers=2)
    stopper = run(cfg)
    stopper.add_callback("on_step_end", lambda tr, rec: rec["step"] == 5 and tr.request_stop("test"))
    cut = stopper.train()
    stopper.close()
    assert train_losses(cut) == {s: expected[s] for s in range(1, 6)}
    resumed = run(cfg, resume_from_checkpoint=tmp_path / "w2" / "checkpoint-5")
    result = resumed.train()
    resumed.close()
    assert train_losses(result) == expected


def test_resume_applies_changed_weight_decay_and_betas(micro, tmp_path):
    """optimizer.load_state_dict restores the saved hyperparameters; the resumed run's config must win."""
    run(micro(tmp_path, max_steps=2, save_steps=2)).train()
    cfg = micro(tmp_path, max_steps=4, save_steps=2, weight_decay=0.5, beta1=0.8, beta2=0.9)
    resumed = run(cfg, resume_from_checkpoint=tmp_path / "checkpoint-2")
    decayed, plain = resumed.optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0  # biases and norms never decay
    assert decayed["betas"] == plain["betas"] == (0.8, 0.9)
    assert resumed.optimizer.state  # the moments still come from the checkpoint


def test_fp16_resume_of_a_checkpoint_without_a_scaler_starts_a_fresh_one(micro, tmp_path, monkeypatch, capsys):
    """A run that was not fp16 saves an empty scaler state; resuming it under fp16 starts a fresh scaler."""
    import minilm.precision
    import minilm.trainer

    run(micro(tmp_path, max_steps=2, save_steps=2, dropout=0.0)).train()
    for module in (minilm.precision, minilm.trainer):
        monkeypatch.setattr(module, "autocast_dtype", lambda cfg, device, cpu_bf16=None: torch.float16)
    cfg = micro(tmp_path, max_steps=4, save_steps=2, dropout=0.0, fp16=True)
    resumed = Trainer(cfg, progress=False, sample_tokens=0, resume_from_checkpoint=tmp_path / "checkpoint-2")
    assert "starting a fresh gradient scaler" in capsys.readouterr().out
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    assert resumed.train().status == "completed"


def test_keyboard_interrupt_right_after_the_update_saves_that_steps_tokens(micro, tmp_path, monkeypatch):
    """An interrupt just after step 3's weight update saves checkpoint-3 with step 3's token count.

    The interrupt is raised by the first clock read after the update (the step time), the first line
    that runs once the update section is left: tokens_seen must already count step 3 by then.
    """
    import time

    import minilm.trainer

    trainer = run(micro(tmp_path), handle_signals=False)

    class Clock:
        raised = False

        def perf_counter(self) -> float:
            if trainer.step == 3 and not trainer._in_update and not self.raised:
                self.raised = True
                raise KeyboardInterrupt
            return time.perf_counter()

    monkeypatch.setattr(minilm.trainer, "time", Clock())
    assert trainer.train().status == "interrupted"
    saved = load_checkpoint(tmp_path / "checkpoint-3")
    assert saved.training_state["tokens_seen"] == 3 * trainer.cfg.tokens_per_step


def test_tokens_per_s_leaves_out_the_warm_up_step(micro, tmp_path, monkeypatch):
    """The first step (allocations; with compile, compilation) is reported apart, not averaged in."""
    from minilm.report import StepClock

    clock = StepClock(start=0.0)
    clock.add(30.0, 1000)  # a compile-sized first step
    assert clock.tokens_per_s == pytest.approx(1000 / 30.0)  # one step: nothing else to go by
    clock.add(0.5, 1000)
    clock.add(0.5, 1000)
    assert clock.warmup_s == 30.0 and clock.tokens_per_s == pytest.approx(2000.0)
    result = run(micro(tmp_path, max_steps=3)).train()
    steps = [r for r in result.history if r["kind"] == "train"]
    steady = sum(r["tokens_per_s"] ** -1 for r in steps[1:])  # seconds per token, per step
    assert result.warmup_s > 0
    assert result.tokens_per_s == pytest.approx(len(steps[1:]) / steady, rel=1e-6)
