"""The chunked LM-head cross-entropy equals the usual F.cross_entropy(lm_head(h)), loss and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import minilm.loss
from minilm.config import Config
from minilm.loss import chunk_rows, linear_cross_entropy
from minilm.model import GPT


def inputs(n=300, c=16, v=50, ignore=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::3] = -1
    return h, w, t


def loss_and_grads(fn, h, w, t, bf16=False, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach().float(), h.grad, w.grad


def usual(h, w, t):
    return F.cross_entropy(F.linear(h, w), t, ignore_index=-1)


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 50 * 64], ids=["one-chunk", "five-chunks"])
@pytest.mark.parametrize("ignore", [False, True], ids=["", "ignore-index"])
def test_fp32_equals_the_usual_loss(monkeypatch, chunk_bytes, ignore):
    if chunk_bytes:
        monkeypatch.setattr(minilm.loss, "CHUNK_BYTES", chunk_bytes)
        assert chunk_rows(50) == 64  # 300 rows: 4 full chunks and one of 44
    h, w, t = inputs(ignore=ignore)
    ref = loss_and_grads(usual, h, w, t, scale=0.5)
    got = loss_and_grads(linear_cross_entropy, h, w, t, scale=0.5)  # a loss gradient other than 1 (accumulation)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_tracks_the_usual_autocast_loss(monkeypatch):
    monkeypatch.setattr(minilm.loss, "CHUNK_BYTES", 4 * 50 * 64)
    h, w, t = inputs(ignore=True)
    ref32 = loss_and_grads(usual, h, w, t)
    ref = loss_and_grads(usual, h, w, t, bf16=True)
    got = loss_and_grads(linear_cross_entropy, h, w, t, bf16=True)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients of fp32 tensors are fp32
    for a, b, exact in zip(got, ref, ref32, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        # no further from fp32 than autocast's own loss
        assert (a - exact).abs().max() <= 1.5 * (b - exact).abs().max() + 1e-6


def test_no_grad_gives_the_loss_alone_and_all_ignored_is_nan():
    h, w, t = inputs()
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t), usual(h, w, t), atol=1e-6)
        assert math.isnan(linear_cross_entropy(h, w, torch.full_like(t, -1)).item())


def test_second_backward_through_the_same_graph_is_right_or_an_error():
    # A loss gradient of exactly 1 (plain loss.backward() on a CPU) leaves the saved gradients as
    # they are, so a second backward gives the same gradients again; any other scale is applied
    # in place, after which reading them again is an error rather than a wrong gradient.
    h, w, t = inputs()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(w.grad, first)
    w.grad = None
    (loss / 4).backward(retain_graph=True)
    assert torch.equal(w.grad, first / 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_chunk_rows_keeps_fp32_logits_under_the_chunk_bytes():
    assert chunk_rows(16000) == 512 and 512 * 16000 * 4 <= minilm.loss.CHUNK_BYTES
    assert chunk_rows(50257) == 128 and chunk_rows(128) == 65536
    assert chunk_rows(10**9) == 1


@pytest.mark.parametrize(
    "changes", [dict(), dict(tie_embeddings=False), dict(bf16=True)], ids=["tied", "untied", "bf16"]
)
def test_model_loss_path_gives_the_same_gradients(changes):
    cfg = Config(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=24, dropout=0.0, **changes)
    torch.manual_seed(0)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    idx, targets = torch.randint(0, 97, (2, 3, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        logits, full = a(idx, targets)
        none, chunked = b(idx, targets, return_logits=False)
    assert none is None and logits.shape == (3, 24, 97)
    full.backward()
    chunked.backward()
    tol = 2e-2 if cfg.bf16 else 1e-5
    torch.testing.assert_close(chunked, full.float(), rtol=tol, atol=tol)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol * p.grad.abs().max().item(), msg=name)
