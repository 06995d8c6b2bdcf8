"""The optimizer and its schedule: AdamW with decoupled weight decay, linear warmup then cosine decay.

One factory serves the trainer, the memory measurement and the benchmarks, so the step
that validates the memory estimate is the step that trains.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilm.config import Config
from minilm.memory import OPTIMIZER_IMPLS  # the kernels' temporary memory is the estimator's business


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup climbs linearly to ``learning_rate`` over ``warmup_steps`` steps (step
    ``warmup_steps - 1`` uses the full rate). Then the rate follows half a cosine from
    ``learning_rate`` down to ``learning_rate * min_lr_ratio`` at ``max_steps``.
    """
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: nn.Module, cfg: Config, *, impl: str = "fused", verbose: bool = True) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (dim >= 2), none on biases and norms.

    Decaying a matrix pulls its weights toward zero, a regulariser; decaying a bias or a
    LayerNorm gain would only shift or shrink activations. ``impl`` picks the kernels (see
    :data:`minilm.memory.OPTIMIZER_IMPLS`); the trainer uses 'fused' where torch has it.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # minGPT's check: every trainable parameter is in exactly one group.
    ids_decay, ids_no_decay = {id(p) for p in decay}, {id(p) for p in no_decay}
    assert not ids_decay & ids_no_decay, "a parameter is in both weight-decay groups"
    assert ids_decay | ids_no_decay == {id(p) for p in params}, "a parameter is in no weight-decay group"
    if verbose:
        print(
            f"AdamW: weight decay {cfg.weight_decay} on {len(decay)} matrices "
            f"({sum(p.numel() for p in decay):,} parameters); none on {len(no_decay)} biases and norms "
            f"({sum(p.numel() for p in no_decay):,} parameters)"
        )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    flags = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **flags)


def default_impl(device: torch.device) -> str:
    """'fused' on CUDA and CPU (one kernel launch for all parameters), 'foreach' elsewhere."""
    return "fused" if device.type in ("cuda", "cpu") else "foreach"
