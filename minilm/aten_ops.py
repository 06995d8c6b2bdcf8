"""PyTorch's own GELU and LayerNorm kernels, as operators ``torch.compile`` cannot see into.

Compiled on a CPU, inductor replaces these two with C++ loops of its own, and on the CPU this
toolkit was tuned on (2-core Xeon with AVX512-BF16 and AMX, torch 2.13, one thread) its loops
were slower than ATen's kernels: GELU on 2M bf16 values, forward 1.59 vs 1.10 ms and backward
2.76 vs 1.60 ms; LayerNorm's backward, with the column sums of its weight and bias gradients,
~2 ms per (1024, 512) call. Wrapped as custom operators (``torch.library.custom_op``, forward
and backward each), they stay ATen's kernels inside the compiled graph. The small config's
compiled bf16 step at 4 x 256 ran 5% faster with the GELU operators (two in-process A/B runs of
12 and 14 alternating steps) and 4-6% faster with the LayerNorm ones (12 and 14 steps), but the
gains do not add up: both together with inductor's C++ wrapper (``compile_policy.compile_model``)
against none of the three measured 0-2% (0.978 and 1.000 of the step time, 16 and 14 steps), on
a shared machine where such runs scatter by about 3%.

:class:`minilm.blocks.MLP` and :class:`LayerNorm` use them only when compiling on a CPU; eagerly
they would be the same kernels behind an extra call, and on a GPU inductor's own code is good.
Values and gradients equal the modules' eager ones (``tests/test_model.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def use_aten_ops(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced by ``torch.compile`` for a CPU: then the operators below run."""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


# --- GELU (exact) ------------------------------------------------------------------------
@torch.library.custom_op("minilm::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


@torch.library.custom_op("minilm::gelu_backward", mutates_args=())
def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x)


@gelu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@gelu_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # what F.gelu's own backward keeps: its input


def _gelu_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return gelu_backward(grad, *ctx.saved_tensors)


gelu.register_autograd(_gelu_backward, setup_context=_gelu_setup)


# --- LayerNorm over the last dimension, with weight and bias ---------------------------------
Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("minilm::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Stats:
    """(y, mean, 1/std): ``aten.native_layer_norm``, whose statistics the backward reuses."""
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)


@torch.library.custom_op("minilm::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> Stats:  # noqa: E501
    """(dx, d weight, d bias) in one ATen kernel."""
    mask = [True, True, True]
    return torch.ops.aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, weight, bias, mask)


@layer_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Stats:
    stats = (*x.shape[:-1], 1)
    return torch.empty_like(x), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@layer_norm_backward.register_fake
def _(grad, x, mean, rstd, weight, bias) -> Stats:
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _layer_norm_setup(ctx, inputs: tuple, output: Stats) -> None:
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, output[1], output[2], weight, bias)  # what nn.LayerNorm's backward keeps


def _layer_norm_backward(ctx, grad: torch.Tensor, _mean_grad, _rstd_grad) -> tuple:
    x, mean, rstd, weight, bias = ctx.saved_tensors
    return (*layer_norm_backward(grad.contiguous(), x, mean, rstd, weight, bias), None)


layer_norm.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state dict), through :func:`layer_norm` when compiling on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_aten_ops(x) and self.weight is not None and self.bias is not None:
            return layer_norm(x, self.weight, self.bias, self.eps)[0]
        return super().forward(x)
