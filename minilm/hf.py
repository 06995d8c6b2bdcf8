"""Load Hugging Face GPT-2 weights into a minilm :class:`~minilm.model.GPT`.

The two models hold the same numbers in slightly different containers: Hugging Face's
``Conv1D`` stores a Linear layer's weight as (in, out), PyTorch's ``nn.Linear`` as
(out, in), so those matrices are transposed on the way in. Everything else maps one to one.

    >>> from transformers import GPT2LMHeadModel          # optional dependency
    >>> hf = GPT2LMHeadModel.from_pretrained("gpt2")      # needs the internet once
    >>> model = gpt2_from_hf(hf)                          # same logits, minilm code

``transformers`` is needed only to produce the Hugging Face model; this module imports it
nowhere.
"""

from __future__ import annotations

from typing import Any

import torch

from minilm.config import Config
from minilm.model import GPT

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# minilm name -> (Hugging Face name, transpose?) for one block; "{i}" is the layer index.
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}


def config_from_hf(hf_config: Any, **overrides: Any) -> Config:
    """A minilm :class:`Config` with the architecture of a Hugging Face ``GPT2Config``.

    Raises ``ValueError`` for GPT-2 variants minilm does not implement (other activations,
    a LayerNorm epsilon other than 1e-5, per-layer attention scaling).
    """
    act = hf_config.activation_function
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported; minilm has {sorted(_ACTIVATIONS)}")
    if abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12:
        raise ValueError(f"layer_norm_epsilon={hf_config.layer_norm_epsilon}; minilm's LayerNorms use 1e-5")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_config, "scale_attn_weights", 1):
        raise ValueError("only standard 1/sqrt(head_dim) attention scaling is supported")
    values = dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.n_embd,
        n_heads=hf_config.n_head,
        n_layers=hf_config.n_layer,
        d_ff=hf_config.n_inner,  # None means 4 * d_model in both libraries
        max_seq_len=hf_config.n_positions,
        activation=_ACTIVATIONS[act],
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        dropout=0.0,
    )
    values.update(overrides)
    return Config(**values)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Rename (and transpose where needed) a ``GPT2LMHeadModel`` state dict for ``GPT(cfg)``."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in hf_state:
            raise KeyError(f"Hugging Face state dict has no '{key}'")
        return hf_state[key]

    out = {
        "wte.weight": get("wte.weight"),
        "wpe.weight": get("wpe.weight"),
        "ln_f.weight": get("ln_f.weight"),
        "ln_f.bias": get("ln_f.bias"),
    }
    for i in range(cfg.n_layers):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            t = get(f"h.{i}.{theirs}")
            out[f"blocks.{i}.{ours}"] = t.t().contiguous() if transpose else t
    out["lm_head.weight"] = out["wte.weight"] if cfg.tie_embeddings else hf_state["lm_head.weight"]
    return out


def gpt2_from_hf(hf_model: Any, **overrides: Any) -> GPT:
    """Build a minilm GPT holding the weights of a Hugging Face ``GPT2LMHeadModel``.

    ``overrides`` set non-architecture fields of the new config (e.g. ``attention='manual'``).
    """
    cfg = config_from_hf(hf_model.config, **overrides)
    model = GPT(cfg)
    state = state_dict_from_hf(hf_model.state_dict(), cfg)
    model.load_state_dict(state, strict=True)
    return model
