"""Training compute in closed form: FLOPs per token and per step, MFU, and Chinchilla's rules of thumb.

**Convention.** One multiply-add is 2 FLOPs. Only matrix multiplications are counted
(LayerNorm, GELU, softmax, the loss and the optimizer add a few percent at most): the
convention of PaLM's MFU, nanoGPT's ``estimate_mfu`` and PyTorch's ``FlopCounterMode``.

With d = d_model, f = d_ff, V = vocab, L = layers and s = sequence length, a token's
forward pass costs

    2 · N_mm        N_mm = L·(4d² + 2·d·f) + V·d   (QKV 3d², output d², MLP 2·d·f, LM head V·d)
    + 4 · L · s · d (q·kᵀ and probabilities·v: each token against all s positions)

N_mm is the parameters that multiply activations: no embeddings (a lookup is free), no
biases or norms, but the LM head even when it is tied to the embedding (a shared weight
is stored once and multiplied once per use). The backward pass costs twice the forward
(a gradient for the input and one for the weight per matmul), so a trained token costs

    6 · N_mm + 12 · L · s · d

with no discount for the causal mask (the PaLM / nanoGPT convention; a causal kernel
skips about half the attention work, and the formula does not take credit for it).

Two figures add to what the hardware executes, but not to the *model* FLOPs MFU uses:
fused SDPA's backward recomputes the attention scores (``FlopCounterMode`` counts its
backward as 2.5× its forward: 14·L·s·d in all, not 12), and gradient checkpointing
repeats each block's forward during backward, all but its last matmul (PyTorch stops the
recompute once backward has what it needs): 2·L·(4d² + d·f) + 4·L·s·d, about +20%.

    >>> from minilm.config import load_config
    >>> cfg = load_config("configs/training/small_model.json")
    >>> flops_per_token(cfg), format_count(flops_per_step(cfg))
    >>> mfu(tokens_per_second=150_000, cfg=cfg, peak_flops="A100 80GB")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from minilm.attention import attention_path
from minilm.config import Config
from minilm.counting import count_parameters, format_count
from minilm.formatting import render_table
from minilm.model import GPT

CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal D ≈ 20·N


@dataclass(frozen=True)
class FlopBreakdown:
    """Training FLOPs per token of one config at one sequence length, by part. All are FLOPs per token."""

    seq_len: int
    matmul_parameters: int  # N_mm: weights that multiply activations, LM head included even when tied
    qkv: int  # forward FLOPs of the QKV projections, all layers: 2·L·3d²
    attention_output: int  # 2·L·d²
    mlp: int  # 2·L·2·d·f
    lm_head: int  # 2·V·d
    attention_scores: int  # q·kᵀ and probs·v: 4·L·s·d
    sdpa_backward_recompute: int  # fused SDPA's backward recomputes the scores: 2·L·s·d (0 on the manual path)
    checkpoint_recompute: int  # gradient checkpointing: the blocks' forward again, minus the MLP output (0 without)

    @property
    def forward(self) -> int:
        return self.qkv + self.attention_output + self.mlp + self.lm_head + self.attention_scores

    @property
    def backward(self) -> int:
        """Twice the forward: each matmul computes a gradient for its input and one for its weight."""
        return 2 * self.forward

    @property
    def total(self) -> int:
        """Model FLOPs per trained token: 6·N_mm + 12·L·s·d. MFU divides by this."""
        return self.forward + self.backward

    @property
    def hardware_total(self) -> int:
        """What the hardware executes: :attr:`total` plus SDPA's and checkpointing's recomputation."""
        return self.total + self.sdpa_backward_recompute + self.checkpoint_recompute

    @property
    def attention_share(self) -> float:
        """Fraction of the model FLOPs spent on attention scores (grows with sequence length)."""
        return 3 * self.attention_scores / self.total

    def rows(self) -> list[tuple[str, int]]:
        """(part, training FLOPs per token) rows, forward + backward (×3), summing to :attr:`total`."""
        return [
            ("QKV projections", 3 * self.qkv),
            ("attention output projection", 3 * self.attention_output),
            ("MLP", 3 * self.mlp),
            ("LM head", 3 * self.lm_head),
            (f"attention scores (s={self.seq_len})", 3 * self.attention_scores),
        ]

    def table(self, fmt: str = "text") -> str:
        """Training FLOPs per token by part, as text or markdown."""
        rows = self.rows() + [("total (model FLOPs: 6·N_mm + 12·L·s·d)", self.total)]
        extra = [
            ("+ SDPA backward recompute", self.sdpa_backward_recompute),
            ("+ checkpointing recompute", self.checkpoint_recompute),
            ("hardware FLOPs", self.hardware_total),
        ]
        if self.hardware_total != self.total:
            rows += [r for r in extra if r[1]]
        if fmt == "markdown":
            body = [[n, f"{v:,} ({format_count(v)})", f"{v / self.total:.1%}"] for n, v in rows]
            return render_table(["part", "FLOPs per token", "share"], body, fmt)
        if fmt != "text":
            raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
        w = max(len(n) for n, _ in rows)
        return "\n".join(f"{n:<{w}}  {v:>16,}  {format_count(v):>7}  {v / self.total:>6.1%}" for n, v in rows)


def flop_breakdown(cfg: Config, seq_len: int | None = None, device_type: str = "cuda") -> FlopBreakdown:
    """Training FLOPs per token of ``GPT(cfg)`` on sequences of ``seq_len`` (default ``cfg.max_seq_len``).

    ``device_type`` only matters for the hardware-FLOPs extra of fused SDPA: on CPU with
    dropout > 0 SDPA falls back to its math path, which does not recompute the scores.
    """
    s = seq_len or cfg.max_seq_len
    d, f, V, L = cfg.d_model, cfg.ff_width, cfg.vocab_size, cfg.n_layers
    fused = attention_path(cfg.attention, cfg.dropout, device_type) == "fused"
    per_layer_mm = 4 * d * d + 2 * d * f
    scores = 4 * L * s * d
    return FlopBreakdown(
        seq_len=s,
        matmul_parameters=L * per_layer_mm + V * d,
        qkv=2 * L * 3 * d * d,
        attention_output=2 * L * d * d,
        mlp=2 * L * 2 * d * f,
        lm_head=2 * V * d,
        attention_scores=scores,
        sdpa_backward_recompute=scores // 2 if fused else 0,
        # Checkpointing re-runs each block's forward, but torch stops the recompute once every
        # tensor backward needs exists: the MLP's output projection (2·d·f) is never re-run.
        checkpoint_recompute=(2 * L * (4 * d * d + d * f) + scores) if cfg.gradient_checkpointing else 0,
    )


def flops_per_token(cfg: Config, seq_len: int | None = None) -> int:
    """Model FLOPs to train on one token (forward + backward): 6·N_mm + 12·L·s·d."""
    return flop_breakdown(cfg, seq_len).total


def flops_per_step(cfg: Config) -> int:
    """Model FLOPs of one optimizer step, all devices: per token × ``cfg.tokens_per_step``."""
    return flops_per_token(cfg) * cfg.tokens_per_step


def _peak(peak_flops: float | str, cfg: Config) -> float:
    if isinstance(peak_flops, str):
        from minilm.hardware import peak_flops as lookup

        return lookup(peak_flops, cfg.precision)
    return float(peak_flops)


def mfu(tokens_per_second: float, cfg: Config, peak_flops: float | str, n_devices: int | None = None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s ÷ the devices' dense peak (a fraction, 0-1).

    ``tokens_per_second`` is the throughput of all ``n_devices`` together (default
    ``cfg.world_size``). ``peak_flops`` is one device's peak FLOP/s, or a device name from
    :mod:`minilm.hardware`, looked up at the config's precision (bf16, fp16, else fp32).
    Recomputation (checkpointing, SDPA's backward) is not credited: that is what makes
    it *model* FLOPs utilisation (PaLM, Chowdhery et al. 2022).
    """
    n = n_devices or cfg.world_size
    return tokens_per_second * flops_per_token(cfg) / (_peak(peak_flops, cfg) * n)


def tokens_per_second_at(cfg: Config, peak_flops: float | str, mfu: float = 0.4, n_devices: int | None = None) -> float:
    """Throughput (tokens/s, all devices) a config would reach at an assumed MFU: :func:`mfu` inverted.

    With gradient checkpointing the devices also run each block's forward again, so the
    same hardware efficiency yields fewer tokens per second: the assumed ``mfu`` is
    applied to model FLOPs + checkpointing's recompute (fused SDPA's own recompute is
    part of any measured MFU already, so it is not charged again).
    """
    fb = flop_breakdown(cfg)
    n = n_devices or cfg.world_size
    return _peak(peak_flops, cfg) * n * mfu / (fb.total + fb.checkpoint_recompute)


# ---------------------------------------------------------------------------------------
# Chinchilla (Hoffmann et al. 2022)
# ---------------------------------------------------------------------------------------
def chinchilla_tokens(n_parameters: int) -> int:
    """Compute-optimal training tokens for a model of N parameters: D ≈ 20·N.

    Chinchilla counts all parameters, embeddings included (Kaplan et al.'s scaling laws
    used non-embedding parameters, one reason the two disagree at small sizes).
    """
    return CHINCHILLA_TOKENS_PER_PARAMETER * n_parameters


def training_flops(n_parameters: int, tokens: int) -> int:
    """The 6·N·D rule: FLOPs to train N parameters on D tokens (attention FLOPs ignored)."""
    return 6 * n_parameters * tokens


@dataclass(frozen=True)
class ComputeOptimal:
    """Chinchilla's compute-optimal budget for one config."""

    n_parameters: int
    tokens: int  # 20·N
    flops_6nd: int  # 6·N·D, Chinchilla's approximation
    flops: int  # the config's own FLOPs per token × D (matmul parameters + attention)
    optimizer_steps: int  # D ÷ tokens per step at the config's batch settings


def compute_optimal(cfg: Config) -> ComputeOptimal:
    """Tokens (20·N), FLOPs and optimizer steps to train ``cfg`` compute-optimally."""
    n = count_parameters(cfg).total
    d = chinchilla_tokens(n)
    return ComputeOptimal(
        n_parameters=n,
        tokens=d,
        flops_6nd=training_flops(n, d),
        flops=flops_per_token(cfg) * d,
        optimizer_steps=-(-d // cfg.tokens_per_step),
    )


# ---------------------------------------------------------------------------------------
# Counting a real forward + backward
# ---------------------------------------------------------------------------------------
_aten = torch.ops.aten


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch 2.13 registers no formula for SDPA's CPU kernel and would count it as zero. These are
# the formulas torch uses for the CUDA flash / efficient kernels (backward = 2.5 × forward).
CPU_SDPA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


@dataclass(frozen=True)
class CountedFlops:
    """FLOPs ``FlopCounterMode`` counted on one real forward + backward, per batch and per token."""

    tokens: int
    forward: int
    backward: int
    by_op: dict[str, int]

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def count_flops(
    cfg: Config,
    batch_size: int = 1,
    seq_len: int | None = None,
    device: str | torch.device = "meta",
    return_logits: bool = True,
) -> CountedFlops:
    """Run one training forward + backward of ``GPT(cfg)`` under ``FlopCounterMode``; return its counts.

    ``device='meta'`` builds the model without allocating memory (any size works); SDPA
    then runs its decomposed math path, counted as plain matmuls (12·L·s·d, like the
    manual path). On a real device SDPA runs its fused kernel, counted with torch's flash
    formulas (14·L·s·d; :data:`CPU_SDPA_FLOP_FORMULAS` supplies them on CPU). Gradient
    checkpointing's recomputation is included, as the hardware runs it. ``return_logits=False``
    runs the trainer's loss (:mod:`minilm.loss`): the same total, but the LM head's two
    gradient matmuls (4·V·d per token) run inside the forward call, so they count there.
    """
    s = seq_len or cfg.max_seq_len
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = GPT(cfg)
        idx = torch.randint(0, cfg.vocab_size, (batch_size, s))
    model.train()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOP_FORMULAS) as fwd:
        loss = model(idx, idx, return_logits=return_logits)[1]
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOP_FORMULAS) as bwd:
        loss.backward()
    by_op: dict[str, int] = {}
    for counter in (fwd, bwd):
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            by_op[str(op)] = by_op.get(str(op), 0) + n
    return CountedFlops(
        tokens=batch_size * s, forward=fwd.get_total_flops(), backward=bwd.get_total_flops(), by_op=by_op
    )
