"""The GPT model: parameter counts, weight tying, shapes, loss, generation."""

import json
import math
from pathlib import Path

import pytest
import torch

from minilm import GPT, Config
from minilm.counting import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def micro(**kw):
    base = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=24)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "training").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_config_model_has_stated_parameter_count(path):
    cfg = Config(**json.loads(path.read_text()))
    with torch.device("meta"):  # shapes only: the large model would need 1.4 GB otherwise
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.estimated_parameters


def test_tied_head_is_the_embedding_tensor():
    model = GPT(micro())
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(micro(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() - model.num_parameters() == 97 * 32
    assert model.num_parameters(non_embedding=True) == count_parameters(micro()).non_embedding


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(micro())
    idx, targets = torch.randint(0, 97, (2, 3, 24))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 24, 97)
    # Small init gives near-uniform predictions: loss close to ln(V).
    assert abs(loss.item() - math.log(97)) < 0.3
    assert model(idx)[1] is None


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(micro(d_model=256, n_heads=4, n_layers=8))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.001


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        GPT(micro())(torch.zeros(1, 25, dtype=torch.long))


def test_generate_greedy_is_deterministic_and_crops_context():
    torch.manual_seed(0)
    model = GPT(micro())
    start = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(start, max_new_tokens=40, temperature=0)  # runs past max_seq_len=24
    assert out.shape == (2, 41)
    assert torch.equal(out, model.generate(start, max_new_tokens=40, temperature=0))


def test_generate_top_k_only_samples_top_tokens():
    torch.manual_seed(0)
    model = GPT(micro())
    idx = torch.randint(0, 97, (1, 5))
    top2 = set(torch.topk(model(idx)[0][0, -1], 2).indices.tolist())
    g = torch.Generator().manual_seed(1)
    seen = {model.generate(idx, 1, temperature=1.0, top_k=2, generator=g)[0, -1].item() for _ in range(30)}
    assert seen <= top2


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(micro())
    start = torch.zeros(1, 1, dtype=torch.long)
    first = model.generate(start, 1, temperature=0)[0, -1].item()
    out = model.generate(start, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 2)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = GPT(micro(dropout=0.0))
    b = GPT(micro(dropout=0.0, gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 97, (2, 24))
    a(idx, idx)[1].backward()
    b(idx, idx)[1].backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_no_bias_variant_builds_and_counts():
    cfg = micro(bias=False)
    model = GPT(cfg)
    assert all("bias" not in n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total


def test_compiled_mlp_on_cpu_runs_atens_gelu_with_the_same_gradients(tracer):
    """Under torch.compile on a CPU the MLP's exact GELU is the opaque minilm::gelu operator (PyTorch's own
    kernel, faster there than inductor's), forward and backward; values and gradients equal eager's."""
    from minilm.blocks import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 64)
    x = torch.randn(2, 5, 16)
    (y_compiled, g_compiled), (y_eager, g_eager) = tracer.outputs_and_grads(mlp, x, lambda y: y.square().sum())
    assert "minilm.gelu.default" in tracer.graphs["forward"]
    assert "minilm.gelu_backward.default" in tracer.graphs["backward"]
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b)
    tanh = MLP(16, 64, activation="gelu_tanh")  # the approximation has no such operator: left to the compiler
    tracer.compile(tanh)(x)
    assert "minilm.gelu.default" not in tracer.graphs["forward"]


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_layer_norm_on_cpu_runs_atens_kernels_with_the_same_gradients(bias, tracer):
    """minilm's LayerNorm is nn.LayerNorm (same state dict); compiled on a CPU it runs ATen's kernels through
    the minilm::layer_norm operators (with a bias; without one, nn.LayerNorm's own path), values and gradients
    as eager."""
    from minilm.aten_ops import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(16, bias=bias)
    assert norm.state_dict().keys() == torch.nn.LayerNorm(16, bias=bias).state_dict().keys()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 16)
    weighted = torch.arange(16.0)
    (y_compiled, g_compiled), (y_eager, g_eager) = tracer.outputs_and_grads(
        norm, x, lambda y: (y * weighted).square().sum()
    )
    assert ("minilm.layer_norm.default" in tracer.graphs["forward"]) == bias
    assert ("minilm.layer_norm_backward.default" in tracer.graphs["backward"]) == bias
    torch.testing.assert_close(y_compiled, y_eager)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_bf16_linear_on_cpu_runs_onednns_fused_bias_with_the_same_gradients(bias, tracer):
    """minilm's Linear is nn.Linear (same state dict); compiled on a CPU under bf16 autocast, with a bias, its
    forward is the minilm::linear operator (oneDNN adds the bias inside the matmul, where addmm first copies
    it into the output); without a bias, or in fp32, it is nn.Linear's own matmul. Values and gradients as
    eager's."""
    from minilm import aten_ops
    from minilm.aten_ops import Linear

    torch.manual_seed(0)
    lin = Linear(16, 24, bias=bias)
    assert lin.state_dict().keys() == torch.nn.Linear(16, 24, bias=bias).state_dict().keys()
    x = torch.randn(2, 5, 16)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    (y_compiled, g_compiled), (y_eager, g_eager) = tracer.outputs_and_grads(
        lin, x, lambda y: y.float().square().sum(), context=bf16
    )
    # Not where oneDNN has no bf16 matmul (a CPU with AVX2 only): there addmm, as eagerly.
    assert ("minilm.linear.default" in tracer.graphs["forward"]) == (bias and aten_ops.ONEDNN_BF16)
    # Its weight gradient: gradᵀ copied row-major, then minilm::mm (which keeps that layout; see _linear_backward).
    assert ("minilm.mm.default" in tracer.graphs["backward"]) == (bias and aten_ops.ONEDNN_BF16)
    assert y_compiled.dtype == y_eager.dtype == torch.bfloat16
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)  # the same oneDNN matmul, rounded once
    for a, b in zip(g_compiled, g_eager, strict=True):
        assert a.dtype == torch.float32  # the parameters' own dtype, as eager's
        torch.testing.assert_close(a, b)
    tracer.compile(lin)(x)  # fp32: left to the compiler
    assert "minilm.linear.default" not in tracer.graphs["forward"]


def test_onednn_bf16_says_whether_onednns_bf16_matmul_runs_here():
    """ONEDNN_BF16 (asked once at import) must match what oneDNN does on this CPU: where it says no (AVX2 only),
    creating the bf16 matmul fails, and compiling in bf16 must then keep addmm."""
    from minilm import aten_ops

    x, w, b = (torch.randn(*shape).bfloat16() for shape in ((6, 16), (24, 16), (24,)))
    if aten_ops.ONEDNN_BF16:
        torch.testing.assert_close(aten_ops.linear(x, w, b), torch.addmm(b, x, w.t()), rtol=0, atol=0)
    elif torch.backends.mkldnn.is_available():
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts each operator called beneath it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def test_eager_fp32_linear_is_onednns_with_addmms_gradients():
    """With onednn_fp32 (the MLP's output projection), an eager fp32 Linear on an x86 CPU runs minilm::linear:
    values and gradients as F.linear's (only the sums' rounding differs), with and without gradients."""
    import torch.nn.functional as F

    from minilm import aten_ops

    torch.manual_seed(0)
    lin = aten_ops.Linear(64, 16, onednn_fp32=True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    with _CountOps() as ops:
        y = lin(x)
    assert ("minilm.linear.default" in ops.calls) == aten_ops.ONEDNN_FP32
    assert "aten.addmm.default" not in ops.calls or not aten_ops.ONEDNN_FP32
    y_ref = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(y, y_ref)
    grads = torch.autograd.grad(y.square().sum(), (x, lin.weight, lin.bias))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, lin.weight, lin.bias))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), y, rtol=0, atol=0)  # the same kernel without autograd
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # under autocast: F.linear, as autocast casts it


def test_checkpointing_never_reruns_the_eager_fp32_linear_and_changes_no_bit():
    """Checkpointing's recompute stops once every tensor the backward needs is saved again. fp32_linear saves
    its inputs before it computes (as addmm does), so the block's last matmul, the MLP's output projection,
    runs once per block in forward and never in the recompute; and both runs use the same kernels, so the
    loss and every gradient are the same to the bit."""
    from minilm import aten_ops

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(micro(bias=True, gradient_checkpointing=checkpointing))
        ids = torch.randint(0, 97, (2, 24))
        with _CountOps() as ops:
            _, loss = model(ids, ids, return_logits=False)
            loss.backward()
        assert ops.calls.get("minilm.linear.default", 0) == (model.cfg.n_layers if aten_ops.ONEDNN_FP32 else 0)
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for a, b in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_minilm_linear_counts_the_flops_of_the_matmul_it_replaces():
    """FlopCounterMode counts minilm::linear as it counts F.linear (addmm: the matmul's 2·N·in·out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from minilm import aten_ops

    x, w, b = torch.randn(6, 16), torch.randn(24, 16), torch.randn(24)
    counts = []
    for f in (aten_ops.linear, torch.nn.functional.linear):
        with FlopCounterMode(display=False) as counter:
            f(x, w, b)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 6 * 16 * 24
    with FlopCounterMode(display=False) as counter:
        y = aten_ops.mm(x, w.t())
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=0)
    assert counter.get_total_flops() == 2 * 6 * 16 * 24  # minilm::mm as aten.mm


def test_the_model_compiles_to_one_graph_on_a_cpu_in_bf16():
    """The CPU operators' conditions (minilm.aten_ops, the attention rule) are traceable: a graph break would
    split the step and undo their fusions (asking torch.backends.mkldnn.is_available() inside forward did)."""
    model = GPT(micro(bias=True))
    ids = torch.randint(0, 97, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(ids, ids, return_logits=False)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
