"""The readable einops attention and the fused SDPA kernel compute the same function."""

import contextlib

import pytest
import torch

from minilm.attention import CausalSelfAttention


def pair(d_model, n_heads, bias=True):
    torch.manual_seed(0)
    manual = CausalSelfAttention(d_model, n_heads, bias=bias, impl="manual")
    fast = CausalSelfAttention(d_model, n_heads, bias=bias, impl="sdpa")
    fast.load_state_dict(manual.state_dict())
    return manual, fast


@pytest.mark.parametrize("d_model, n_heads, T, bias", [(32, 4, 7, True), (64, 8, 33, False), (48, 1, 16, True)])
def test_forward_and_gradients_agree(d_model, n_heads, T, bias):
    manual, fast = pair(d_model, n_heads, bias)
    x = torch.randn(3, T, d_model)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = manual(x1), fast(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y1)
    y1.backward(grad_out)
    y2.backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (name, p1), (_, p2) in zip(manual.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_causal_future_tokens_do_not_leak(impl):
    manual, fast = pair(32, 4)
    attn = manual if impl == "manual" else fast
    x = torch.randn(1, 10, 32)
    y = attn(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 32)  # change only the future of position 5
    y2 = attn(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_first_position_attends_only_to_itself():
    manual, _ = pair(16, 2)
    x = torch.randn(1, 5, 16)
    # Position 0 sees only itself, so its output is proj(v_0) whatever follows.
    v0 = manual.qkv(x)[:, 0, 32:]
    torch.testing.assert_close(manual(x)[:, 0], manual.proj(v0))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must divide"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="impl"):
        CausalSelfAttention(32, 4, impl="flash")


def test_sdpa_under_cpu_autocast_runs_the_kernel_in_fp32(monkeypatch):
    """On CPU under bf16 autocast the fused kernel gets fp32 inputs (faster there), and hands back bf16."""
    manual, fast = pair(32, 4)
    x = torch.randn(2, 9, 32)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, y_manual = fast(x), manual(x)
    assert seen == [(torch.float32, False)]
    assert y_fast.dtype == y_manual.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_manual.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_fast.float(), manual(x), rtol=2e-2, atol=2e-2)  # and near full fp32


def test_sdpa_under_cpu_autocast_runs_in_bf16_where_that_is_faster(monkeypatch):
    """At sequence length x head size² >= the measured threshold the kernel gets the bf16 q, k, v as they are."""
    from minilm.attention import SDPA_BF16_MIN_T_D2, sdpa_in_fp32

    assert sdpa_in_fp32(128, 64) and not sdpa_in_fp32(256, 64) and not sdpa_in_fp32(1024, 32)
    assert sdpa_in_fp32(1024, 64, dropout_p=0.1)  # dropout: only the math fallback exists, kept in fp32
    manual, fast = pair(128, 2)  # head size 64
    T = SDPA_BF16_MIN_T_D2 // 64**2
    x = torch.randn(1, T, 128)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, y_manual = fast(x), manual(x)
    assert seen == [torch.bfloat16] and y_fast.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_manual.float(), rtol=3e-2, atol=3e-2)


def _fp64_grads(q, k, v, dy):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True).backward(dy.double())
    return q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize("shape", [(2, 3, 64, 16), (1, 2, 256, 64)])
def test_matmul_backward_is_as_accurate_as_the_fused_kernels(shape):
    """CausalAttentionCPU: the fused forward, and gradients no further from fp64 than the fused bf16 backward's."""
    from minilm.attention import CausalAttentionCPU

    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn(shape, dtype=torch.bfloat16)
    y = CausalAttentionCPU.apply(q, k, v)
    y.backward(dy)
    ours = q.grad, k.grad, v.grad
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y_fused = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    y_fused.backward(dy)
    assert torch.equal(y, y_fused)  # the same forward kernel
    for name, mine, fused, exact in zip(
        "qkv", ours, (q2.grad, k2.grad, v2.grad), _fp64_grads(q, k, v, dy), strict=True
    ):
        err = ((mine.double() - exact).norm() / exact.norm()).item()
        err_fused = ((fused.double() - exact).norm() / exact.norm()).item()
        assert mine.dtype == torch.bfloat16 and err < 1e-2, (name, err)
        assert err <= 1.1 * err_fused, f"d{name}: {err:.2e} vs the fused kernel's {err_fused:.2e}"


def test_matmul_backward_counts_the_closed_forms_attention_flops():
    """Its five matmuls are the closed form's backward (8·s·d per token) plus SDPA's recompute (2·s·d)."""
    from torch.utils.flop_counter import FlopCounterMode

    from minilm.attention import CausalAttentionCPU

    B, H, T, D = 2, 3, 32, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    y = CausalAttentionCPU.apply(q, k, v)
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == (8 + 2) * T * (H * D) * (B * T)


def test_matmul_backward_only_where_it_was_measured_faster():
    from minilm.attention import COMPILED_MATMUL_BACKWARD_MAX_T as max_t
    from minilm.attention import compiled_matmul_backward

    assert compiled_matmul_backward(max_t, compiling=True) and compiled_matmul_backward(16, compiling=True)
    assert not compiled_matmul_backward(max_t + 1, compiling=True)
    assert not compiled_matmul_backward(64, dropout_p=0.1, compiling=True)
    assert not compiled_matmul_backward(64, compiling=False) and not compiled_matmul_backward(64)  # eager


def test_compiled_attention_under_cpu_autocast_runs_the_matmul_backward(tracer):
    """Traced by torch.compile under bf16 autocast: the fused kernel forward, no fused backward kernel,
    and the same gradients as the eager module."""
    _, fast = pair(64, 2)  # head size 32
    x = torch.randn(2, 48, 64)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    (_, g_compiled), (_, g_eager) = tracer.outputs_and_grads(fast, x, lambda y: y.float().square().sum(), bf16)
    assert any("_scaled_dot_product_flash_attention_for_cpu" in t for t in tracer.graphs["forward"])
    backward = tracer.graphs["backward"]
    assert not any("flash_attention" in t for t in backward) and any("bmm" in t for t in backward)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_compiled_under_autocast_the_matmul_backward_keeps_its_scores_in_fp32(tracer):
    """Compiled, autocast reaches into an autograd.Function's backward: q.float() @ k.float() there became a
    bf16 matmul, the scores rounded to bf16. Through aten_ops.matmul_nt_of_bf16_values they stay fp32, so the
    compiled backward gives the eager one's gradients (rounding aside)."""
    from minilm.attention import CausalAttentionCPU

    class Attend(torch.nn.Module):
        def forward(self, qkv):
            return CausalAttentionCPU.apply(*qkv.unbind(0))

    torch.manual_seed(0)
    qkv = (3 * torch.randn(3, 1, 2, 128, 32)).bfloat16().requires_grad_()  # large scores: rounding shows
    dy = torch.randn(1, 2, 128, 32, dtype=torch.bfloat16)
    grads = []
    for module, context in ((tracer.compile(Attend()), torch.autocast("cpu", dtype=torch.bfloat16)), (Attend(), None)):
        qkv.grad = None
        with context or contextlib.nullcontext():
            y = module(qkv)
        y.backward(dy)
        grads.append(qkv.grad.double())
    assert "minilm.matmul_nt_of_bf16_values.default" in tracer.graphs["backward"]
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-3
