"""Export a minilm checkpoint as a Hugging Face ``GPT2LMHeadModel`` folder.

    minilm export --checkpoint outputs/tiny/checkpoint-600 --out hf/tiny
    python train.py export --checkpoint outputs/tiny --out hf/tiny     # newest checkpoint in a folder

The folder holds what ``transformers`` reads, with no network and no minilm installed::

    hf/tiny/
        config.json              GPT2Config: the architecture (minilm.hf.config_to_hf)
        model.safetensors        the weights, GPT-2 names (minilm.hf.state_dict_to_hf); no pickle
        tokenizer.json           the tokenizer in the Hugging Face ``tokenizers`` format
        tokenizer_config.json    tells AutoTokenizer to wrap it in PreTrainedTokenizerFast
        generation_config.json   no BOS/EOS token (minilm's tokenizers have none)

and then::

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained("hf/tiny")
    >>> tok = AutoTokenizer.from_pretrained("hf/tiny")
    >>> out = model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=50, do_sample=False)

GPT-2 has a fixed architecture; every minilm config maps onto it exactly:

- ``bias: false``: zero biases are written (adding zero is the same function);
- ``tie_embeddings: false``: ``tie_word_embeddings: false`` and a stored ``lm_head.weight``;
- ``activation``: 'gelu' (exact erf) is GPT-2's ``gelu``, 'gelu_tanh' its ``gelu_pytorch_tanh``;
- a ``vocab_size`` larger than the tokenizer's (padding rows, or BPE that ran out of merges):
  the exported vocabulary is the tokenizer's, the unused rows are dropped. minilm's sampler
  masks those ids anyway (``minilm.generation.generate_text``), so the logits of every real token
  and the greedy text are unchanged.

What does not carry over: a character tokenizer silently drops characters outside its
vocabulary in ``tokenizers`` (minilm raises), and the Hugging Face model refuses inputs longer
than ``max_seq_len`` (minilm's ``generate`` crops the context to the last ``max_seq_len`` tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from minilm.checkpoint import CheckpointError, list_checkpoints, load_model
from minilm.config import Config
from minilm.hf import config_to_hf, state_dict_to_hf
from minilm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, TokenizerError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class ExportError(ValueError):
    """A model or tokenizer that cannot be written as a GPT-2 folder; the message names the field."""


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` that gives exactly ``tokenizer``'s ids and text.

    BPE is already one (a copy is returned). A character tokenizer becomes a BPE model with the
    characters as its vocabulary and no merges (so every character is one token, spaces and
    newlines included) and a ``Fuse`` decoder (tokens joined with nothing between them).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    if isinstance(tokenizer, BPETokenizer):
        return HFTokenizer.from_str(tokenizer.hf.to_str())
    if isinstance(tokenizer, CharTokenizer):
        hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
        hf.decoder = decoders.Fuse()
        return hf
    raise ExportError(f"tokenizer kind {getattr(tokenizer, 'kind', type(tokenizer).__name__)!r} cannot be exported")


def export_model(model: torch.nn.Module, tokenizer: Tokenizer, cfg: Config, out: str | Path) -> Path:
    """Write ``model`` (a minilm GPT with config ``cfg``) and ``tokenizer`` as a Hugging Face folder.

    The folder is written next to ``out`` and renamed into place, so ``out`` is never half
    written; an existing ``out`` is replaced. Returns ``out``. Raises :class:`ExportError` when
    the tokenizer has more tokens than the model has rows (field ``vocab_size``).
    """
    from safetensors.torch import save_file

    n_tokens = tokenizer.vocab_size
    if n_tokens > cfg.vocab_size:
        raise ExportError(
            f"field 'vocab_size' is {cfg.vocab_size} but the tokenizer has {n_tokens} tokens: "
            "the model has no embedding row for some token ids"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        weights = state_dict_to_hf(model.state_dict(), cfg, vocab_size=n_tokens)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, config_to_hf(cfg, vocab_size=n_tokens))
        _write_json(tmp / GENERATION_CONFIG_FILE, {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
        hf_tokenizer(tokenizer).save(str(tmp / TOKENIZER_FILE))
        _write_json(
            tmp / TOKENIZER_CONFIG_FILE,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.max_seq_len,
                # Keep decode() exact: no space clean-up around punctuation, no special tokens added.
                "clean_up_tokenization_spaces": False,
                "add_bos_token": False,
                "add_eos_token": False,
            },
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a checkpoint folder (or the newest checkpoint in an output_dir) to ``out``; returns ``out``."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / "manifest.json").exists() and list_checkpoints(path):
        path = list_checkpoints(path)[-1]
    model, tokenizer, cfg = load_model(path, device="cpu")
    return export_model(model, tokenizer, cfg, out)


def export_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or f"{Path(sys.argv[0]).name} export"
    parser = argparse.ArgumentParser(
        prog=prog, description="Write a checkpoint as a Hugging Face GPT2LMHeadModel folder (safetensors)."
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint-N folder, or an output_dir (its newest checkpoint)."
    )
    parser.add_argument("--out", required=True, type=Path, help="Folder to write (replaced if it exists).")
    return parser


def run_export(argv: list[str]) -> int:
    """``minilm export``: 0 written, 1 a checkpoint or tokenizer that cannot be exported, 2 bad arguments."""
    ns = export_parser().parse_args(argv)
    try:
        out = export_checkpoint(ns.checkpoint, ns.out)
    except (CheckpointError, TokenizerError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
