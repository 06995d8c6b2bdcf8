"""PyTorch's own GELU, LayerNorm and Linear kernels, an fp32 matmul of bf16 values and a matmul that keeps
its operands' layout, as operators ``torch.compile`` cannot see into.

Compiled on a CPU, inductor replaces GELU and LayerNorm with C++ loops of its own, and on the CPU this
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

The Linear operator is oneDNN's matmul with the bias added in its epilogue. In bf16, inductor's
addmm (like eager's) first copies the broadcast bias into the output and then accumulates the
product onto it, ~0.25 ms per (1024, 2048) output; the step ran 2.0% faster with it (an in-process
A/B run of 12 alternating steps), and the outputs are bit-identical to addmm's.

:class:`minilm.blocks.MLP`, :class:`LayerNorm` and :class:`Linear` use them when compiling on a
CPU (Linear in bf16 only: compiled in fp32, oneDNN's matmul was slower than addmm's at the small
config's shapes), and the MLP's output projection eagerly in fp32 too (the last paragraph).
Eagerly GELU and LayerNorm would be the same kernels behind an extra call, and on a GPU
inductor's own code is good.

Compiled, their values and gradients equal the modules' eager ones (``tests/test_model.py``).

Eagerly in fp32 on an x86 CPU, the MLP's output projection runs through :func:`linear` too
(:func:`fp32_linear`; the other Linear layers stay addmm). Measured on the tiny config (32 x 128, one
thread, Xeon with AMX, in-process A/B runs of 20-40 alternating steps): all four Linear layers
through :func:`linear` ran the step in 0.963, 0.956 and 0.969 of addmm's time, all but the MLP's
output projection in 1.002, 1.001 and 0.992, and that one alone in 0.980 to 0.990 (six runs; 0.990
with MKL and oneDNN held to AVX2): the gain is its (4096, 512) x (512, 128) matmul's, which MKL
runs slower with the weight transposed. At the small config's 4 x 256 it is noise (1.002). The
whole tiny step against nanoGPT's (same process, same weights, 40 alternating rounds) ran at 1.005
and 1.015 of its speed with it, 0.989 to 0.998 without.
A custom operator alone would have cost gradient checkpointing a matmul: its recompute stops once
every tensor the backward needs is saved again, and ATen's addmm saves its inputs before it
computes, a custom operator only after, so a block's last matmul would be re-run for nothing.
:func:`fp32_linear` saves first, as addmm does (checkpointed and plain runs use the same kernel,
so lesson 7's bit-identical losses hold; oneDNN's and MKL's fp32 sums differ in the last bits).
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula


def _onednn_bf16() -> bool:
    """Whether this build has oneDNN and oneDNN has bf16 matmuls on this CPU: not on one with AVX2 only,
    where creating one fails ("could not create a primitive descriptor"); AVX-512 emulates them."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # what inductor's oneDNN passes ask
    except (AttributeError, RuntimeError):  # an older torch without the question: assume not
        return False


# Asked once: torch.compile cannot trace the question (a graph break).
ONEDNN_BF16 = _onednn_bf16()
# oneDNN's fp32 matmul for :func:`fp32_linear`: measured faster on x86 CPUs only (with and without AVX-512).
ONEDNN_FP32 = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


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


# --- Linear with a bias, in bf16 ---------------------------------------------------------------
@torch.library.custom_op("minilm::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (N, in) · weightᵀ (in, out) + bias -> (N, out): oneDNN's matmul, the bias added in its epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)  # what addmm's backward keeps


def _linear_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weight = ctx.saved_tensors
    # The weight gradient gradᵀ·x from a contiguous copy of gradᵀ (inductor's tiled transpose) through mm below:
    # given the transposed view, oneDNN's bf16 matmul reorders it itself, slower ((512, 1024) x (1024, 2048),
    # compiled: 3.0 ms with the view, 2.1 with copy and matmul). The compiled small step ran in 0.938 of the
    # time (in-process A/B runs of 16 and 20 alternating steps). Copying x instead, where it is smaller,
    # leaves a transposed gradient to copy again (1.02).
    return grad @ weight, mm(grad.t().contiguous(), x), grad.sum(0)  # (N, in), (out, in), (out,)


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- A matmul that keeps its operands' layout --------------------------------------------------
@torch.library.custom_op("minilm::mm", mutates_args=())
def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, a (M, K) and b (K, N) -> (M, N), opaque to the compiler: inductor then hands it a and b
    laid out as traced. Given ``torch.mm(g.t().contiguous(), x)`` it lays the copy out like its source
    (transposed, strides (1, M)), which undoes the copy's point; this operator gets it row-major."""
    return torch.mm(a, b)


@mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


@register_flop_formula(torch.ops.minilm.mm)
def _mm_flops(a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as FlopCounterMode counts aten.mm


@register_flop_formula(torch.ops.minilm.linear)
def _linear_flops(x_shape, w_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # the matmul's, as FlopCounterMode counts addmm


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through :func:`linear` when compiling for a CPU in bf16 (autocast or
    bf16 tensors) with a bias and oneDNN's bf16 matmul; None otherwise (the caller runs F.linear)."""
    if bias is None or not ONEDNN_BF16 or not use_aten_ops(x):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype != torch.bfloat16:
        return None
    flat = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in): autocast would cast all three the same way
    return linear(flat, weight.to(dtype), bias.to(dtype)).view(*x.shape[:-1], weight.shape[0])


# --- An fp32 matmul of bf16 values, on bf16 units ---------------------------------------------
@torch.library.custom_op("minilm::matmul_nt_of_bf16_values", mutates_args=())
def matmul_nt_of_bf16_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ bᵀ`` in fp32, a (..., M, K) and b (..., N, K) fp32 tensors that hold bf16 values (e.g.
    ``x.float()`` of a bf16 x) -> (..., M, N).

    The product of two bf16 numbers is exact in fp32, so oneDNN may run this matmul on its bf16
    units without changing a bit of the inputs: fp32 matmuls are allowed bf16 inputs ("medium"
    precision) while it runs, and only then. At (32, 256, 64) x (32, 64, 256) on one AMX core:
    0.6 ms, against 2.4 ms in full fp32 and 0.55 ms for a bf16 matmul, whose bf16 output is off by
    up to 0.12 where this one is within 4e-6 of fp64. Opaque to the compiler on purpose: the
    precision setting must hold while the matmul runs, which a traced graph would not keep, and it
    stays inside it. Batched as one bmm over contiguous rows, with bᵀ a view (no transposing copy).
    """
    *batch, m, k = a.shape
    rows = a.reshape(-1, m, k)  # (batch, M, K): a view when a is contiguous
    cols = b.reshape(-1, b.shape[-2], k)  # (batch, N, K)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        return torch.bmm(rows, cols.transpose(1, 2)).view(*batch, m, b.shape[-2])
    finally:
        torch.set_float32_matmul_precision(previous)


@matmul_nt_of_bf16_values.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-2]))


@register_flop_formula(torch.ops.minilm.matmul_nt_of_bf16_values)
def _matmul_nt_flops(a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-2]  # (..., M, K) @ (..., K, N): 2·M·K·N per batch entry


# --- Linear in fp32, eagerly: oneDNN's matmul, its inputs saved before it runs -------------------
class _SaveLinearInputs(torch.autograd.Function):
    """The backward of ``x · weightᵀ + bias``. Its forward only saves x and weight and returns a free
    stand-in for the output (a zero broadcast to (N, out)) for :class:`_LinearProduct`, which computes
    it: so the inputs are saved before the product exists, as ATen's addmm saves them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.new_zeros(()).expand(x.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ x, grad.sum(0)  # F.linear's gradients (MKL takes gradᵀ as a view)


class _LinearProduct(torch.autograd.Function):
    """x (N, in) · weightᵀ + bias through :func:`linear`; the output's gradient goes to the stand-in."""

    @staticmethod
    def forward(ctx, stand_in: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through oneDNN's fused-bias matmul, eagerly, for fp32 tensors on an
    x86 CPU outside autocast, with a bias; None otherwise (the caller runs F.linear).

    With gradients, two autograd nodes: one saves x and weight, the next computes. Gradient
    checkpointing's recompute then stops at the first, as it does at addmm, never re-running the
    product (see the module docstring).
    """
    fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if bias is None or not ONEDNN_FP32 or x.device.type != "cpu" or not fp32 or torch.compiler.is_compiling():
        return None
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad or bias.requires_grad):
        stand_in = _SaveLinearInputs.apply(flat, weight, bias)
        y = _LinearProduct.apply(stand_in, flat.detach(), weight.detach(), bias.detach())
    else:
        y = linear(flat, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict), through :func:`linear` when compiling on a CPU in
    bf16, and eagerly in fp32 with ``onednn_fp32`` (:func:`fp32_linear`: the MLP's output projection)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, onednn_fp32: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.onednn_fp32 = onednn_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = bf16_linear(x, self.weight, self.bias)
        if y is None and self.onednn_fp32:
            y = fp32_linear(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state dict), through :func:`layer_norm` when compiling on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_aten_ops(x) and self.weight is not None and self.bias is not None:
            return layer_norm(x, self.weight, self.bias, self.eps)[0]
        return super().forward(x)
