"""The GPU suite: what only a CUDA device can show. Skipped (each test) on a machine without CUDA.

Run it on a GPU machine, from the repository root (under 5 minutes on one H100-class GPU)::

    python -m pytest tests/gpu -o addopts="" -q

``-o addopts=""`` drops the nbval options of the default run, so it also works where nbval is
not installed. Every config runs as shipped, except ``large``'s world_size (one GPU here).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from minilm.checkpoint import load_checkpoint
from minilm.config import load_config
from minilm.measure import measure_training_step
from minilm.memory import estimate_training_memory
from minilm.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[2]


def shipped(name: str, **changes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(name)
    return cfg.replace(**changes)


def short_run(cfg, tmp_path, steps: int = 4, **trainer_kwargs) -> Trainer:
    cfg = cfg.replace(
        max_steps=steps,
        warmup_steps=min(cfg.warmup_steps, steps),
        eval_steps=steps,
        save_steps=steps,
        eval_batches=1,
        output_dir=str(tmp_path),
        device="cuda",
    )
    kwargs = dict(progress=False, verbose=False, sample_tokens=0, handle_signals=False) | trainer_kwargs
    return Trainer(cfg, **kwargs)


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_every_shipped_config_trains_as_shipped(name, tmp_path):
    """num_workers, pin_memory, precision and checkpointing as in the file (this crashed at the first batch)."""
    cfg = shipped(name, world_size=1)
    trainer = short_run(cfg, tmp_path, steps=3)
    result = trainer.train()
    trainer.close()
    assert result.status == "completed" and math.isfinite(result.train_loss), result.message
    assert result.mfu is not None and 0 < result.mfu < 1  # against the datasheet (or measured) peak


def test_fp16_with_a_real_gradient_scaler_skips_an_overflowing_step(tmp_path):
    cfg = shipped("tiny", fp16=True, bf16=False, dropout=0.0)
    trainer = short_run(cfg, tmp_path, steps=6)
    assert trainer.scaler.is_enabled()
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)  # the first steps must overflow
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.cfg = trainer.cfg.replace(max_steps=1)
    trainer.train()
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an overflowing fp16 step changed the weights"
    assert trainer.scaler.get_scale() < 2.0**60  # the scaler backed off
    trainer.cfg = trainer.cfg.replace(max_steps=6)
    result = trainer.train()
    assert result.status == "completed" and math.isfinite(result.train_loss)


@pytest.mark.parametrize("changes", [{"bf16": True}, {"bf16": True, "gradient_checkpointing": True}, {"compile": True}])
def test_precision_checkpointing_and_compile_train(changes, tmp_path):
    trainer = short_run(shipped("small", **changes), tmp_path, steps=4)
    result = trainer.train()
    trainer.close()
    assert result.status == "completed" and math.isfinite(result.train_loss)
    keys = load_checkpoint(result.checkpoint).model_state.keys()
    assert not any(k.startswith("_orig_mod.") for k in keys)


def test_checkpointing_changes_no_loss(tmp_path):
    losses = []
    for ckpt in (False, True):
        trainer = short_run(shipped("tiny", dropout=0.0, gradient_checkpointing=ckpt), tmp_path / str(ckpt), steps=5)
        losses.append(trainer.train().losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # recomputation reorders no reduction that matters


def test_resume_continues_the_same_losses(tmp_path, monkeypatch):
    """Deterministic algorithms on: the resumed run's losses equal the uninterrupted run's."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        cfg = shipped("tiny", dropout=0.1)
        full = short_run(cfg, tmp_path / "full", steps=8).train().losses
        first = short_run(cfg, tmp_path / "resumed", steps=8)
        first.add_callback("on_step_end", lambda tr, rec: tr.request_stop("halfway") if rec["step"] == 4 else None)
        assert first.train().status == "interrupted"  # saved checkpoint-4 on the way out
        resumed = short_run(
            cfg, tmp_path / "resumed", steps=8, resume_from_checkpoint=tmp_path / "resumed" / "checkpoint-4"
        )
        rest = resumed.train().losses
    finally:
        torch.use_deterministic_algorithms(False)
    assert rest[-4:] == pytest.approx(full[-4:], rel=1e-6, abs=1e-6)


def test_sampling_from_a_checkpoint(tmp_path):
    result = short_run(shipped("tiny"), tmp_path, steps=2).train()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "minilm.cli",
            "sample",
            "--checkpoint",
            str(result.checkpoint),
            "--max_new_tokens",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_memory_estimate_holds_against_max_memory_allocated(name):
    cfg = shipped(name, world_size=1)
    measured = measure_training_step(cfg, device="cuda").peak_bytes
    estimated = estimate_training_memory(cfg, device_type="cuda").peak_bytes
    assert abs(estimated - measured) / measured <= 0.05, f"estimate {estimated:,} vs measured {measured:,}"


def test_make_table_measures_on_the_gpu(tmp_path):
    args = ["--device", "cuda", "--configs", "tiny", "--results", str(tmp_path), "--output", str(tmp_path / "b.md")]
    out = subprocess.run([sys.executable, "benchmarks/make_table.py", *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["machine"]["device"] != "cpu"
    page = (tmp_path / "b.md").read_text()
    assert record["machine"]["device"] in page and "max_memory_allocated" in page
