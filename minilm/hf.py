"""Convert between Hugging Face GPT-2 and a minilm :class:`~minilm.model.GPT`, both ways.

The two models hold the same numbers in slightly different containers: Hugging Face's
``Conv1D`` stores a Linear layer's weight as (in, out), PyTorch's ``nn.Linear`` as
(out, in), so those matrices are transposed on the way in. Everything else maps one to one.

    >>> from transformers import GPT2LMHeadModel          # optional dependency
    >>> hf = GPT2LMHeadModel.from_pretrained("gpt2")      # needs the internet once
    >>> model = gpt2_from_hf(hf)                          # same logits, minilm code

The other direction (:func:`config_to_hf`, :func:`state_dict_to_hf`) is what
``minilm export`` (:mod:`minilm.export`) writes; the name map below serves both, so the two
directions cannot disagree.

``transformers`` is needed only to produce or load the Hugging Face model; this module imports
it nowhere.
"""

from __future__ import annotations

from typing import Any

import torch

from minilm.config import Config
from minilm.model import GPT

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# minilm activation -> the Hugging Face name of the very same function: "gelu" is the exact erf
# GELU there too, and "gelu_pytorch_tanh" calls torch's tanh approximation (gelu_new writes the
# formula out, which rounds differently in the last bits).
_ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# minilm module -> (Hugging Face module, is it a Conv1D?) for one block. Hugging Face's Conv1D
# stores a Linear's weight transposed; its bias and the LayerNorms map as they are.
_BLOCK_MODULES = {
    "ln_1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.proj": ("attn.c_proj", True),
    "ln_2": ("ln_2", False),
    "mlp.fc": ("mlp.c_fc", True),
    "mlp.proj": ("mlp.c_proj", True),
}
# minilm name -> (Hugging Face name, transpose?) inside block i (`blocks.{i}.` and `h.{i}.`).
_BLOCK_MAP = {
    f"{ours}.{p}": (f"{theirs}.{p}", conv1d and p == "weight")
    for ours, (theirs, conv1d) in _BLOCK_MODULES.items()
    for p in ("weight", "bias")
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


# ---------------------------------------------------------------------------------------
# minilm -> Hugging Face
# ---------------------------------------------------------------------------------------
def config_to_hf(cfg: Config, vocab_size: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` with ``cfg``'s architecture, as a plain dict.

    ``vocab_size`` (default ``cfg.vocab_size``) may be smaller than the model's: export drops the
    padding rows no token uses (see :func:`state_dict_to_hf`). There is no BOS/EOS token: minilm's
    tokenizers have none, and GPT-2's default 50256 would lie outside a small vocabulary.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size if vocab_size is None else vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,  # null: 4 * n_embd in both libraries
        "activation_function": _ACTIVATIONS_TO_HF[cfg.activation],
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which minilm uses
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
    }


def state_dict_to_hf(
    state: dict[str, torch.Tensor], cfg: Config, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """A minilm state dict renamed (and transposed) for ``GPT2LMHeadModel``: the inverse of :func:`state_dict_from_hf`.

    - ``bias: false``: GPT-2 always has biases, so zeros are written; a zero bias adds nothing,
      the same function.
    - ``vocab_size``: keep only the first ``vocab_size`` rows of the token embedding and the
      head (the ids the tokenizer produces; padding rows are never used).
    - A tied head is not stored (``tie_word_embeddings`` rebuilds it); an untied one is
      ``lm_head.weight``.

    Returns fresh contiguous tensors, none sharing memory (what ``safetensors`` requires).
    """
    v = cfg.vocab_size if vocab_size is None else vocab_size
    if not 0 < v <= cfg.vocab_size:
        raise ValueError(f"vocab_size {v} must be between 1 and the model's vocab_size {cfg.vocab_size}")

    def get(name: str, out_features: int | None = None) -> torch.Tensor:
        if name in state:
            return state[name]
        if name.endswith(".bias") and not cfg.bias:
            width = out_features if out_features is not None else cfg.d_model
            return torch.zeros(width, dtype=state["wte.weight"].dtype)
        raise KeyError(f"minilm state dict has no '{name}'")

    out = {
        "transformer.wte.weight": get("wte.weight")[:v],
        "transformer.wpe.weight": get("wpe.weight"),
        "transformer.ln_f.weight": get("ln_f.weight"),
        "transformer.ln_f.bias": get("ln_f.bias"),
    }
    for i in range(cfg.n_layers):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            width = None
            if ours.endswith(".bias"):  # a Linear's bias has its weight's out_features
                weight = state.get(f"blocks.{i}.{ours[: -len('bias')]}weight")
                width = weight.shape[0] if weight is not None and weight.dim() == 2 else None
            t = get(f"blocks.{i}.{ours}", width)
            out[f"transformer.h.{i}.{theirs}"] = t.t() if transpose else t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")[:v]
    return {k: t.detach().to("cpu").clone().contiguous() for k, t in out.items()}
