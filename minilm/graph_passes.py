"""A rewrite of the compiled backward graph: a tied embedding's gradient scattered into the head's.

With tied embeddings one (V, C) weight has two gradients: the LM head's, a dense (V, C) matmul
product, and the token embedding's, which is nonzero only in the rows of the B·T tokens seen.
AOTAutograd writes the embedding's as ATen's backward does, a scatter into a fresh zero tensor,
and then adds the two:

    grad = head_grad + index_put(zeros(V, C), [ids], rows, accumulate=True)

which costs a pass that writes 4·V·C bytes of zeros and one that reads them back, for a
scatter of B·T·C values. :class:`ScatterIntoSum` rewrites it as

    grad = index_put(head_grad, [ids], rows, accumulate=True)

the same sum, with repeated tokens' rows added in a different order (so equal to rounding).
In the small config's compiled bf16 step at 4 x 256 (V·C = 8.2M fp32 values), the step ran
2.9% faster in an in-process A/B run of 12 alternating steps.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

aten = torch.ops.aten


class ScatterIntoSum(CustomGraphPass):
    """Inductor post-grad pass: ``add(x, scatter_add(zeros, ...))`` -> ``scatter_add(x, ...)``.

    ``scatter_add`` is ``aten._unsafe_masked_index_put_accumulate``, what ``embedding_dense_backward``
    decomposes to. ``rewritten`` counts the rewrites in the last graph passed (for tests).
    """

    def __init__(self):
        self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
                continue
            for put, other in (node.args, node.args[::-1]):
                if _scatter_into_zeros(put) and _same_tensor_type(put, other, node):
                    with graph.inserting_before(node):
                        into_sum = graph.call_function(put.target, (other, *put.args[1:]))
                    into_sum.meta.update(node.meta)
                    node.replace_all_uses_with(into_sum)
                    zeros = put.args[0]
                    for dead in (node, put, zeros):
                        graph.erase_node(dead)
                    self.rewritten += 1
                    break

    def uuid(self) -> str:
        return "minilm.graph_passes.ScatterIntoSum/1"  # inductor's cache key: change with the rewrite


def _scatter_into_zeros(node: object) -> bool:
    """An accumulating scatter into a zero tensor that nothing else reads."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten._unsafe_masked_index_put_accumulate.default:
        return False
    zeros = node.args[0]
    return (
        len(node.users) == 1
        and isinstance(zeros, torch.fx.Node)
        and zeros.target is aten.full.default
        and zeros.args[1] == 0
        and len(zeros.users) == 1
    )


def _same_tensor_type(*nodes: object) -> bool:
    """All are graph nodes with one shape and dtype (no broadcasting, no type promotion in the add)."""
    vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in nodes]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return False
    return all(v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals)
