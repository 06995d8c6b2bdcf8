"""minilm.graph_passes: a tied embedding's gradient scattered into the head's, in compiled backward graphs."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from minilm.config import Config
from minilm.graph_passes import ScatterIntoSum
from minilm.model import GPT

aten = torch.ops.aten
V, C = 50, 8


def head_plus_embedding_grad(head_grad, ids, rows):
    """What a tied weight's gradient is: the head's plus the embedding's (ATen's backward, padding_idx -1)."""
    return head_grad + aten.embedding_dense_backward(rows, ids, V, -1, False)


def traced(fn, *args):
    """fn as inductor's post-grad passes see it: decomposed to the ops inductor lowers."""
    from torch._inductor.decomposition import select_decomp_table

    return make_fx(fn, decomposition_table=select_decomp_table())(*args)


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 7, 3], [0, V - 1, 3]])  # token 3 three times: its rows add up
    return torch.randn(V, C, generator=g), ids, torch.randn(2, 3, C, generator=g)


def test_the_scatter_goes_into_the_heads_gradient_and_the_sum_is_unchanged():
    args = inputs()
    gm = traced(head_plus_embedding_grad, *args)
    ops = lambda: [n.target for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert aten.full.default in ops() and aten.add.Tensor in ops()  # zeros, scatter into them, add
    rewrite = ScatterIntoSum()
    rewrite(gm.graph)
    gm.recompile()
    assert rewrite.rewritten == 1
    assert aten.full.default not in ops() and aten.add.Tensor not in ops()
    torch.testing.assert_close(gm(*args), head_plus_embedding_grad(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        # the zeros are read twice: they must stay zeros
        lambda h, i, r: (lambda e: (h + e, e))(aten.embedding_dense_backward(r, i, V, -1, False)),
        # broadcasting add: the scatter's shape is not the sum's
        lambda h, i, r: h[:1] + aten.embedding_dense_backward(r, i, V, -1, False),
        # a type-promoting add (bf16 + fp32): the sum is not in the scatter's dtype
        lambda h, i, r: h.bfloat16() + aten.embedding_dense_backward(r, i, V, -1, False),
    ],
    ids=["zeros-read-twice", "broadcast", "promotion"],
)
def test_graphs_the_rewrite_would_change_are_left_alone(fn):
    args = inputs()
    gm = traced(fn, *args)
    before = [n.target for n in gm.graph.nodes]
    rewrite = ScatterIntoSum()
    rewrite(gm.graph)
    assert rewrite.rewritten == 0 and [n.target for n in gm.graph.nodes] == before


@pytest.mark.parametrize("tied", [True, False])
def test_a_compiled_tied_gpt_gets_one_rewrite_and_eagers_gradients(tied):
    """Real inductor code (no cache, so the pass runs): the tied weight's backward is rewritten once and
    the gradients match eager's; an untied model has nothing to rewrite."""
    cfg = Config(vocab_size=V, d_model=C * 2, n_heads=2, n_layers=1, d_ff=32, max_seq_len=8, tie_embeddings=tied)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    rewrite = ScatterIntoSum()
    compiled = torch.compile(model, options={"post_grad_custom_post_pass": rewrite, "fx_graph_cache": False})
    grads = []
    for m in (compiled, model):
        model.zero_grad()
        m(ids, ids, return_logits=False)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert rewrite.rewritten == (1 if tied else 0)  # the last graph through the pass is the backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
