"""Lesson 7's training loop by hand (batch, forward, loss, backward, clip, AdamW, warmup-cosine) equals Trainer."""

import math

import pytest
import torch
import torch.nn.functional as F

from minilm import GPT
from minilm.data import BatchSampler, prepare_data
from minilm.optim import lr_at
from minilm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def learning_rate(step, cfg):
    """Linear warmup to the peak, then half a cosine down to min_lr_ratio of it (the lesson's formula)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def train_by_hand(cfg, cache_dir, steps):
    """The loop as the lesson writes it; returns (loss, gradient norm before clipping) per step."""
    _, train_tokens, _ = prepare_data(cfg, cache_dir)
    sampler = BatchSampler(train_tokens, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
    record = []
    for step in range(steps):
        x, y = sampler.get_batch(step)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record.append((loss.item(), norm.item()))
    return record, model


@pytest.mark.parametrize("changes", [{}, {"dropout": 0.1}], ids=["no dropout", "dropout"])
def test_hand_written_loop_equals_trainer(micro_config, tmp_path, changes):
    """Equal to float rounding: the Trainer computes the same cross-entropy a chunk of positions at a
    time (minilm.loss), summing in another order, so its losses differ in the 7th digit, not more."""
    cfg = micro_config(tmp_path / "run", max_steps=12, warmup_steps=4, eval_steps=12, save_steps=12, **changes)
    assert all(learning_rate(s, cfg) == lr_at(s, cfg) for s in range(cfg.max_steps))
    by_hand, model = train_by_hand(cfg, tmp_path / "cache", cfg.max_steps)
    trainer = Trainer(cfg, cache_dir=tmp_path / "cache", progress=False, verbose=False, sample_tokens=0)
    result = trainer.train()
    records = [r for r in result.history if r["kind"] == "train"]
    assert [loss for loss, _ in by_hand] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert [norm for _, norm in by_hand] == pytest.approx([r["grad_norm"] for r in records], rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), trainer.raw_model.parameters(), strict=True):
        # Adam divides by the gradient's own size, so a bias whose gradient is ~0 can turn a rounding
        # difference into a step of up to the learning rate: weights agree to a fraction of one step.
        torch.testing.assert_close(p, q, rtol=0, atol=cfg.learning_rate, msg=name)
    assert by_hand[-1][0] < by_hand[0][0] - 0.3  # and it learns


def test_a_changed_loop_is_caught(micro_config, tmp_path):
    """The equality is strict: the same loop without clipping gives other losses."""
    cfg = micro_config(tmp_path / "run", max_steps=6, warmup_steps=2, grad_clip=0.05)
    clipped, _ = train_by_hand(cfg, tmp_path / "cache", 6)
    unclipped, _ = train_by_hand(cfg.replace(grad_clip=1e9), tmp_path / "cache", 6)
    assert clipped[0] == unclipped[0]  # the first loss comes before any update
    assert [loss for loss, _ in clipped[1:]] != [loss for loss, _ in unclipped[1:]]
