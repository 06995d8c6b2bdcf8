"""The readable einops attention and the fused SDPA kernel compute the same function."""

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


def test_the_cpu_autocast_rule():
    """The measured boundaries: written out up to T = 4·D, then SDPA in fp32, then in bf16; dropout: fp32."""
    from minilm.attention import SDPA_BF16_MIN_T_D2, cpu_autocast_kernel

    assert [cpu_autocast_kernel(T, 64) for T in (64, 256, 257, 1024)] == ["manual", "manual", "sdpa-bf16", "sdpa-bf16"]
    assert [cpu_autocast_kernel(T, 32) for T in (128, 129, 512, 1024)] == [
        "manual",
        "sdpa-fp32",
        "sdpa-fp32",
        "sdpa-bf16",
    ]
    assert cpu_autocast_kernel(SDPA_BF16_MIN_T_D2 // 32**2 - 1, 32) == "sdpa-fp32"
    assert cpu_autocast_kernel(64, 64, dropout_p=0.1) == "sdpa-fp32"  # only SDPA's math fallback, kept in fp32


@pytest.mark.parametrize(
    "d_model, n_heads, T, expected",
    [(32, 4, 9, "manual"), (64, 4, 128, "sdpa-fp32"), (128, 2, 257, "sdpa-bf16")],  # head sizes 8, 16, 64
)
def test_sdpa_under_cpu_autocast_runs_the_rules_kernel(monkeypatch, d_model, n_heads, T, expected):
    """Under bf16 autocast on CPU, impl='sdpa' runs the kernel the rule names (what reaches SDPA, in which
    dtype, or the written-out path), hands back bf16, and agrees with the manual path."""
    import minilm.attention as attention

    manual, fast = pair(d_model, n_heads)
    x = torch.randn(1, T, d_model)
    seen = []
    sdpa, written_out = torch.nn.functional.scaled_dot_product_attention, attention.manual_attention

    def spy_sdpa(q, k, v, **kwargs):
        seen.append("sdpa-bf16" if q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu") else "sdpa-fp32")
        return sdpa(q, k, v, **kwargs)

    def spy_manual(*args):
        seen.append("manual")
        return written_out(*args)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(attention, "manual_attention", spy_manual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = fast(x)
        seen_fast, seen[:] = list(seen), []
        y_manual = manual(x)
    assert seen_fast == [expected] and seen == ["manual"]
    assert y_fast.dtype == y_manual.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_manual.float(), rtol=3e-2, atol=3e-2)
