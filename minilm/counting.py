"""Exact parameter counts from a config alone, in closed form (no model is built).

With d = d_model, f = d_ff, V = vocab_size, P = max_seq_len, L = n_layers:

    token embedding      V·d
    position embedding   P·d
    per layer:
        attention        QKV 3d² + 3d, output projection d² + d     = 4d² + 4d
        MLP              2·d·f + f + d
        two LayerNorms   4d
        total            4d² + 2·d·f + f + 9d   (= 12d² + 13d when f = 4d)
    final LayerNorm      2d
    LM head              0 when tied to the token embedding, else V·d

Without biases every "+ k·d" bias term and the LayerNorm biases drop out. A tied
weight is one tensor used twice, so it is counted once (as ``sum(p.numel())`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from minilm.formatting import render_table

if TYPE_CHECKING:  # counting reads a config's shape fields; the config module uses counting to check estimates
    from minilm.config import Config


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one config, by component. All values are numbers of scalars."""

    token_embedding: int
    position_embedding: int
    attention_per_layer: int  # QKV + output projection, weights and biases
    mlp_per_layer: int
    norms_per_layer: int  # ln_1 + ln_2
    n_layers: int
    final_norm: int
    lm_head: int  # 0 when tied

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def blocks(self) -> int:
        return self.per_layer * self.n_layers

    @property
    def embeddings(self) -> int:
        return self.token_embedding + self.position_embedding + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embeddings and LM head (Kaplan et al.'s N)."""
        return self.blocks + self.final_norm

    @property
    def total(self) -> int:
        return self.embeddings + self.non_embedding

    def rows(self) -> list[tuple[str, int]]:
        """(component, parameters) rows that sum to :attr:`total`."""
        L = self.n_layers
        return [
            ("token embedding", self.token_embedding),
            ("position embedding", self.position_embedding),
            (f"attention ({L} layers)", self.attention_per_layer * L),
            (f"MLP ({L} layers)", self.mlp_per_layer * L),
            (f"LayerNorms ({L} layers)", self.norms_per_layer * L),
            ("final LayerNorm", self.final_norm),
            ("LM head" + (" (tied: shares the token embedding)" if self.lm_head == 0 else ""), self.lm_head),
        ]


def count_parameters(cfg: Config) -> ParameterCount:
    """Closed-form parameter count of ``GPT(cfg)``; equals ``sum(p.numel())`` exactly."""
    d, f, V, P = cfg.d_model, cfg.ff_width, cfg.vocab_size, cfg.max_seq_len
    b = 1 if cfg.bias else 0
    norm = 2 * d if cfg.bias else d  # LayerNorm: weight (+ bias)
    return ParameterCount(
        token_embedding=V * d,
        position_embedding=P * d,
        attention_per_layer=(3 * d * d + b * 3 * d) + (d * d + b * d),
        mlp_per_layer=(d * f + b * f) + (f * d + b * d),
        norms_per_layer=2 * norm,
        n_layers=cfg.n_layers,
        final_norm=norm,
        lm_head=0 if cfg.tie_embeddings else V * d,
    )


def format_count(n: int | float) -> str:
    """Short human form: 33936384 -> '33.9M', 1.3e9 -> '1.30B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
    return str(int(n))


def parameter_table(cfg: Config, fmt: str = "text") -> str:
    """The breakdown as a text table (``fmt='text'``) or a markdown table (``fmt='markdown'``)."""
    pc = count_parameters(cfg)
    rows = pc.rows() + [("total", pc.total), ("non-embedding", pc.non_embedding)]
    if fmt == "markdown":
        return render_table(
            ["component", "parameters", "share"], [[name, f"{n:,}", f"{n / pc.total:.1%}"] for name, n in rows], fmt
        )
    if fmt != "text":
        raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
    width = max(len(name) for name, _ in rows)
    lines = [f"{'component':<{width}}  {'parameters':>14}  {'share':>6}", "-" * (width + 24)]
    for name, n in rows:
        if name == "total":
            lines.append("-" * (width + 24))
        lines.append(f"{name:<{width}}  {n:>14,}  {n / pc.total:>6.1%}")
    return "\n".join(lines)


def decay_split(cfg: Config) -> tuple[int, int]:
    """(matrix, vector) parameters: AdamW's two groups, weight decay on matrices only.

    Matrices (tensors with dim >= 2) are the embeddings, the LM head when untied and the
    four weight matrices per layer; vectors are biases and LayerNorm parameters. The two
    sum to ``count_parameters(cfg).total``. Memory estimates need the split because a
    foreach optimizer makes its temporaries one group at a time.
    """
    d, f, L = cfg.d_model, cfg.ff_width, cfg.n_layers
    pc = count_parameters(cfg)
    matrices = pc.token_embedding + pc.position_embedding + pc.lm_head + L * (4 * d * d + 2 * d * f)
    return matrices, pc.total - matrices


def parameter_shapes(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor of ``GPT(cfg)`` as (name, shape), in ``model.named_parameters()`` order.

    Closed form, no model built. A tied LM head is the token embedding's tensor, so it is
    listed once (as ``wte.weight``), as ``named_parameters()`` does. The memory estimate
    uses the order: a for-loop optimizer's temporaries depend on which tensors are neighbours.
    """
    d, f, V, P = cfg.d_model, cfg.ff_width, cfg.vocab_size, cfg.max_seq_len

    def linear(name: str, n_in: int, n_out: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (n_out, n_in))] + ([(f"{name}.bias", (n_out,))] if cfg.bias else [])

    def norm(name: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (d,))] + ([(f"{name}.bias", (d,))] if cfg.bias else [])

    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (V, d)), ("wpe.weight", (P, d))]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        shapes += norm(f"{p}.ln_1") + linear(f"{p}.attn.qkv", d, 3 * d) + linear(f"{p}.attn.proj", d, d)
        shapes += norm(f"{p}.ln_2") + linear(f"{p}.mlp.fc", d, f) + linear(f"{p}.mlp.proj", f, d)
    shapes += norm("ln_f")
    if not cfg.tie_embeddings:
        shapes.append(("lm_head.weight", (V, d)))
    return shapes
