"""Generate docs/config-reference.md from the Config dataclass, so the two cannot drift.

Every field's name, type, default, limits and help text come from ``minilm.config.Config``
(the same metadata that validates JSON files and builds the ``--<field>`` command-line
flags). Only the "Fields that interact" section is written by hand, below, as data: each
entry names the fields it is about, and generation fails if one of them no longer exists.

    python scripts/gen_config_reference.py           # rewrite docs/config-reference.md
    python scripts/gen_config_reference.py --check   # exit 1 if the file is out of date

``tests/test_docs.py`` runs the check: add a field to ``Config`` without regenerating and
the test suite fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from minilm.config import FIELDS, SHAPE_FIELDS, _describe_allowed, field_nullable, field_type  # noqa: E402

OUTPUT = ROOT / "docs" / "config-reference.md"

GROUPS = {
    "model": "Model shape",
    "data": "Data",
    "training": "Training schedule and optimizer",
    "system": "System: precision, memory, devices, files",
    "meta": "Description",
}

# (title, fields it is about, markdown text). Written by hand; fields are checked to exist.
INTERACTIONS: list[tuple[str, tuple[str, ...], str]] = [
    (
        "Heads must divide the width",
        ("n_heads", "d_model"),
        "Each head gets `d_model / n_heads` dimensions (`Config.head_dim`), so `n_heads` must divide "
        "`d_model`. Loading a config that breaks this raises `ConfigError` and lists the head counts "
        "that would work. Changing `n_heads` alone changes neither the parameter count nor the matmul "
        "FLOPs; it changes the attention-score memory (`n_heads · seq² · batch` elements per layer on "
        "the `manual` path).",
    ),
    (
        "`d_ff` defaults to four times the width",
        ("d_ff", "d_model"),
        "`d_ff: null` means `4 · d_model` (`Config.ff_width`). The MLP holds `2 · d_model · d_ff` of "
        "each layer's weights, two thirds of the block when `d_ff = 4 · d_model`.",
    ),
    (
        "One context length for positions and for training",
        ("max_seq_len", "batch_size"),
        "`max_seq_len` is both the number of learned position embeddings (`max_seq_len · d_model` "
        "parameters) and the length of every training sequence. Activation memory grows linearly in "
        "it, and the attention scores quadratically on the `manual` path; FLOPs per token grow by "
        "`12 · n_layers · max_seq_len · d_model`. Generation crops its context to the last "
        "`max_seq_len` tokens.",
    ),
    (
        "Tokens per optimizer step",
        ("batch_size", "grad_accumulation_steps", "world_size", "max_seq_len", "learning_rate"),
        "One optimizer step consumes `batch_size · grad_accumulation_steps · world_size · max_seq_len` "
        "tokens (`Config.tokens_per_step`). Only `batch_size` (and `max_seq_len`) set the activation "
        "memory of one device; accumulation and more GPUs grow the effective batch without it. "
        "Halving `batch_size` while doubling `grad_accumulation_steps` keeps the optimization the same "
        "and roughly halves activation memory. A learning rate tuned at one tokens-per-step is not "
        "automatically right at another.",
    ),
    (
        "Run length and the Chinchilla budget",
        ("max_steps", "batch_size", "grad_accumulation_steps", "world_size", "max_seq_len"),
        "Tokens trained = `max_steps · tokens_per_step`. Compute-optimal training (Hoffmann et al. "
        "2022) is about 20 tokens per parameter; the shipped configs choose `max_steps` to land near "
        "it. See [choosing a model size](concepts/sizing.md).",
    ),
    (
        "Warmup and decay",
        ("warmup_steps", "max_steps", "learning_rate", "min_lr_ratio"),
        "The learning rate rises linearly over `warmup_steps` to `learning_rate`, then follows a "
        "cosine down to `learning_rate · min_lr_ratio` at `max_steps`. `warmup_steps` must be at most "
        "`max_steps` (else `ConfigError`). Overriding `max_steps` on the command line for a short run "
        "may therefore also need a smaller `warmup_steps`.",
    ),
    (
        "At most one mixed-precision mode",
        ("fp16", "bf16", "device"),
        "`fp16` and `bf16` cannot both be true (`ConfigError`). Both keep fp32 master weights, so "
        "they shrink activation memory, not the 16 bytes per parameter of weights, gradients and "
        "AdamW state. `fp16` needs a gradient scaler (its range is narrow), which the trainer adds; "
        "`bf16` does not, but needs hardware support. What runs depends on the device "
        "(`minilm.precision.autocast_dtype`): on a GPU without bf16, `bf16: true` runs fp16 with the "
        "scaler; on a CPU either switch runs bf16 if the CPU has native bf16 instructions, else fp32. "
        "See the [training guide](training.md#mixed-precision).",
    ),
    (
        "Gradient checkpointing trades compute for memory",
        ("gradient_checkpointing", "batch_size", "n_layers"),
        "With `gradient_checkpointing: true` each block keeps only its input during the forward and "
        "recomputes its insides during backward: saved activations drop from roughly "
        "`n_layers` blocks' worth to one block's worth plus one `(batch, seq, d_model)` tensor per "
        "layer, for about 20% more compute (most of each block's forward runs again).",
    ),
    (
        "Tied embeddings are counted once",
        ("tie_embeddings", "vocab_size", "d_model"),
        "With `tie_embeddings: true` the LM head reuses the token-embedding matrix: `vocab_size · "
        "d_model` parameters are stored, trained and counted once. The head's matmul still runs, so "
        "FLOPs per token are the same tied or untied.",
    ),
    (
        "Biases",
        ("bias",),
        "`bias: false` removes every Linear bias and the LayerNorm biases (GPT-2 has them). It changes "
        "the count by a few `d_model`-sized vectors per layer: under 0.1% of a GPT-2-sized model.",
    ),
    (
        "Attention kernel and dropout",
        ("attention", "dropout"),
        "`attention: sdpa` calls the fused `scaled_dot_product_attention` kernel, which never stores the "
        "`(seq × seq)` score matrix when a flash or memory-efficient kernel is used; `manual` writes the "
        "softmax out in einops for reading and stores it. On CPU, SDPA with `dropout > 0` falls back to "
        "the math path, which stores the scores again.",
    ),
    (
        "Vocabulary and tokenizer",
        ("vocab_size", "tokenizer", "dataset"),
        "`vocab_size` sets the size of the embedding and of the logits (`batch · seq · vocab_size` "
        "fp32 values, often the largest single tensor in training). It must be large enough for the "
        "tokenizer chosen for `dataset`: the character tokenizer needs one id per distinct character "
        "(84 for the bundled Shakespeare); the byte-level BPE tokenizer needs at least 256 and learns "
        "up to `vocab_size` tokens. Too small raises an error that names the minimum.",
    ),
    (
        "Parallel processes",
        ("world_size",),
        "`world_size` is the number of data-parallel processes the config was written for, and must "
        "equal the number the launcher started: `world_size > 1` without `torchrun`, or a `torchrun` "
        "process count that differs, stops with a `ConfigError` that gives both fixes. Every "
        "process holds a full copy of the model, so per-GPU memory does not shrink with more GPUs; "
        "tokens per step grow instead. Under `torchrun` with CUDA each process uses the GPU numbered "
        "by its local rank, whatever `device` says.",
    ),
    (
        "Checkpoints and evaluation",
        ("save_steps", "eval_steps", "save_total_limit", "output_dir", "max_steps"),
        "A checkpoint is written to `output_dir` every `save_steps` steps, and the oldest are deleted "
        "beyond `save_total_limit` (0 keeps all). Validation loss is computed every `eval_steps` steps "
        "on `eval_batches` micro-batches. Both also happen at the last step, so intervals larger than "
        "`max_steps` mean once, at the end.",
    ),
    (
        "Fields a checkpoint fixes",
        SHAPE_FIELDS,
        "Resuming (`--resume_from_checkpoint`) requires these to equal the checkpoint's: they fix the "
        "network's shape or its token ids. A mismatch stops with a `CheckpointError` naming each field. "
        "Every other field (learning rate, batch settings, precision, `world_size`, ...) may change on "
        "resume; the trainer prints which did.",
    ),
    (
        "Compilation",
        ("compile",),
        "`compile: true` compiles the model with `torch.compile` after any checkpoint is loaded. The "
        "first steps are slow while it compiles, so early `tokens_per_s` readings understate the speed. "
        "Checkpoints are saved from the uncompiled module and load either way.",
    ),
    (
        "Stated parameter estimate",
        ("estimated_parameters",),
        "If set, loading the config counts the real parameters and warns "
        "(`ParameterEstimateWarning`) when the stated number is off by more than 10%. JSON may "
        'spell it as a string such as `"124M"` or `"1.3B"`.',
    ),
    (
        "Data loading",
        ("num_workers", "pin_memory", "device"),
        "`num_workers` background processes prepare batches; `pin_memory` page-locks them so copies "
        "to a CUDA device can overlap compute. `pin_memory` does nothing useful on a CPU-only run.",
    ),
]


def _json(value: object) -> str:
    return json.dumps(value)


def _type_name(name: str) -> str:
    t = field_type(name).__name__
    return f"{t} or null" if field_nullable(name) else t


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(fields: Mapping[str, dataclasses.Field] | None = None) -> str:
    """The whole of docs/config-reference.md, as a string."""
    fields = FIELDS if fields is None else fields
    out: list[str] = [
        "# Config reference",
        "",
        "<!-- GENERATED by scripts/gen_config_reference.py from minilm.config.Config. Do not edit by hand:",
        "     change the dataclass (or the script's INTERACTIONS) and run the script. -->",
        "",
        "A minilm run is described by one flat JSON object (see `configs/training/*.json`). Every key is "
        "a field of the `minilm.config.Config` dataclass, listed below with its type, default and "
        "allowed values. Keys not listed here are rejected with a suggestion of the nearest name.",
        "",
        "Every field can also be set on the command line as `--<field> VALUE`, which overrides the "
        "file (booleans accept `true`/`false`; nullable fields accept `null`):",
        "",
        "<!-- slow: trains the 110M-parameter base model to the end -->",
        "```bash",
        "python train.py --config configs/training/base_model.json --learning_rate 0.00005",
        "```",
        "",
        "A value outside its limits raises `minilm.ConfigError` naming the file and the field. "
        "This page is generated from the dataclass by `python scripts/gen_config_reference.py`; "
        "`tests/test_docs.py` fails when the two differ.",
        "",
        "**Groups:** "
        + " · ".join(f"[{title}](#{_anchor(title)})" for title in GROUPS.values())
        + " · [Fields that interact](#fields-that-interact)",
        "",
    ]
    seen = set()
    for group, title in GROUPS.items():
        names = [n for n, f in fields.items() if f.metadata.get("group") == group]
        if not names:
            continue
        out += [f"## {title}", "", "| field | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for name in names:
            f = fields[name]
            out.append(
                f"| `{name}` | {_type_name(name)} | `{_json(f.default)}` | {_cell(_describe_allowed(f))} "
                f"| {_cell(f.metadata['help'])} |"
            )
            seen.add(name)
        out.append("")
    missing = set(fields) - seen
    if missing:
        raise ValueError(f"fields with no known group: {sorted(missing)} (groups: {list(GROUPS)})")

    out += [
        "## Fields that interact",
        "",
        "Limits on one field are checked above; these are the relations between fields. The ones "
        "enforced on load are marked **(checked)**.",
        "",
    ]
    for title, names, text in INTERACTIONS:
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ValueError(f"INTERACTIONS entry {title!r} names fields that do not exist: {unknown}")
        checked = " **(checked)**" if title in _CHECKED else ""
        out += [f"### {title}{checked}", "", "Fields: " + ", ".join(f"`{n}`" for n in names) + ".", "", text, ""]
    return "\n".join(out).rstrip("\n") + "\n"


_CHECKED = {"Heads must divide the width", "Warmup and decay", "At most one mixed-precision mode"}


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs; write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
