"""One flat config for a minilm run: model shape, training schedule and system switches.

The :class:`Config` dataclass is the single source of truth for every field's name,
type, default and limits. JSON files, command-line overrides, the notebook widget
editor and the generated docs all read it, so they cannot drift apart.

    >>> from minilm.config import load_config
    >>> cfg = load_config("configs/training/tiny_model.json", overrides={"batch_size": 8})
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from minilm.counting import count_parameters


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


class ParameterEstimateWarning(UserWarning):
    """A config's stated ``estimated_parameters`` disagrees with the true count."""


def _f(default: Any, group: str, help: str, **limits: Any) -> Any:
    """A dataclass field carrying its documentation and limits as metadata.

    Recognised limits: ``minimum`` / ``maximum`` (inclusive), ``exclusive_minimum``,
    ``choices`` (allowed values), ``pattern`` (a regular expression a string must match in
    full) with ``pattern_help`` (the same rule in words, for error messages and the docs),
    and ``widget_max`` (upper end of a notebook slider).
    """
    return field(default=default, metadata={"group": group, "help": help, **limits})


@dataclass(frozen=True)
class Config:
    """A validated run config. Frozen: change fields with :meth:`replace`, which validates the copy.

    (``cfg.batch_size = -3`` raises ``dataclasses.FrozenInstanceError`` instead of being accepted.)
    """

    # --- description ------------------------------------------------------------------
    description: str = _f("", "meta", "What this config is for, in one sentence.")
    estimated_parameters: int | None = _f(
        None,
        "meta",
        "Parameter count the author expects (int, or a string such as '124M'). "
        "Checked against the true count on load: off by more than 10% warns.",
        minimum=0,
    )

    # --- model ------------------------------------------------------------------------
    vocab_size: int = _f(16000, "model", "Tokens in the vocabulary.", minimum=1, widget_max=65536)
    d_model: int = _f(512, "model", "Width of the residual stream (embedding size).", minimum=1, widget_max=2048)
    n_heads: int = _f(8, "model", "Attention heads per layer; must divide d_model.", minimum=1, widget_max=32)
    n_layers: int = _f(8, "model", "Transformer blocks.", minimum=1, widget_max=48)
    d_ff: int | None = _f(
        None, "model", "Feed-forward (MLP) hidden width; null means 4 * d_model.", minimum=1, widget_max=8192
    )
    max_seq_len: int = _f(
        1024,
        "model",
        "Context length: learned positions, and tokens per training sequence.",
        minimum=1,
        widget_max=4096,
    )
    dropout: float = _f(
        0.0, "model", "Dropout probability (embeddings, attention, residual).", minimum=0.0, maximum=0.9
    )
    bias: bool = _f(True, "model", "Biases in Linear layers and LayerNorms (GPT-2 has them).")
    tie_embeddings: bool = _f(True, "model", "Share the token embedding with the LM head (GPT-2 style).")
    activation: str = _f(
        "gelu", "model", "MLP nonlinearity: exact GELU, or GPT-2's tanh approximation.", choices=("gelu", "gelu_tanh")
    )
    attention: str = _f(
        "sdpa",
        "model",
        "Attention kernel: 'sdpa' (fused scaled_dot_product_attention) or 'manual' (readable einops).",
        choices=("sdpa", "manual"),
    )

    # --- data -------------------------------------------------------------------------
    dataset: str = _f(
        "shakespeare", "data", "'shakespeare' (bundled corpus), or a path to a text file or folder of .txt files."
    )
    tokenizer: str = _f(
        "bpe", "data", "'char' (one token per character) or 'bpe' (byte-level BPE).", choices=("char", "bpe")
    )
    val_fraction: float = _f(
        0.1, "data", "Fraction of the corpus held out for validation.", exclusive_minimum=0.0, maximum=0.5
    )

    # --- training ---------------------------------------------------------------------
    learning_rate: float = _f(
        3e-4, "training", "Peak learning rate (after warmup).", exclusive_minimum=0.0, maximum=1.0
    )
    min_lr_ratio: float = _f(
        0.1, "training", "Cosine decay ends at learning_rate * min_lr_ratio.", minimum=0.0, maximum=1.0
    )
    weight_decay: float = _f(0.1, "training", "AdamW weight decay (matrices only, not biases or norms).", minimum=0.0)
    beta1: float = _f(0.9, "training", "AdamW beta1.", minimum=0.0, maximum=0.999999)
    beta2: float = _f(0.95, "training", "AdamW beta2.", minimum=0.0, maximum=0.999999)
    grad_clip: float = _f(1.0, "training", "Clip the global gradient norm to this; 0 disables.", minimum=0.0)
    batch_size: int = _f(8, "training", "Sequences per micro-batch, per device.", minimum=1, widget_max=256)
    grad_accumulation_steps: int = _f(
        1, "training", "Micro-batches accumulated per optimizer step.", minimum=1, widget_max=256
    )
    max_steps: int = _f(10000, "training", "Optimizer steps in the whole run.", minimum=1, widget_max=1_000_000)
    warmup_steps: int = _f(500, "training", "Linear warmup steps; at most max_steps.", minimum=0, widget_max=100_000)
    save_steps: int = _f(1000, "training", "Save a checkpoint every this many steps.", minimum=1, widget_max=100_000)
    eval_steps: int = _f(
        500, "training", "Evaluate on validation data every this many steps.", minimum=1, widget_max=100_000
    )
    eval_batches: int = _f(20, "training", "Validation micro-batches per evaluation.", minimum=1, widget_max=1000)
    save_total_limit: int = _f(3, "training", "Keep at most this many checkpoints; 0 keeps all.", minimum=0)
    seed: int = _f(1337, "training", "Seed for weights, data order and dropout.", minimum=0)

    # --- system -----------------------------------------------------------------------
    world_size: int = _f(
        1, "system", "Processes (GPUs) in data-parallel training; checked against torchrun.", minimum=1
    )
    parallelism: str = _f(
        "ddp",
        "system",
        "With world_size > 1: 'ddp' (every process holds the whole model) or 'fsdp' (FSDP2: weights, "
        "gradients and AdamW state sharded across processes).",
        choices=("ddp", "fsdp"),
    )
    reshard_after_forward: bool = _f(
        True,
        "system",
        "fsdp only: free each block's gathered weights after its forward (ZeRO-3); false keeps them "
        "until its backward (ZeRO-2: more memory, less communication).",
    )
    checkpoint_format: str = _f(
        "auto",
        "system",
        "'full' (rank 0 gathers the whole model into model.safetensors), 'sharded' (every process writes its "
        "own shard with torch.distributed.checkpoint) or 'auto' (sharded under fsdp with world_size > 1).",
        choices=("auto", "full", "sharded"),
    )
    fp16: bool = _f(False, "system", "float16 autocast with a gradient scaler (GPU).")
    bf16: bool = _f(False, "system", "bfloat16 autocast (GPU, or CPUs with native bf16).")
    gradient_checkpointing: bool = _f(False, "system", "Recompute each block's activations in backward to save memory.")
    num_workers: int = _f(0, "system", "Background data-loading workers.", minimum=0, widget_max=32)
    pin_memory: bool = _f(False, "system", "Page-locked host memory for faster host-to-GPU copies.")
    compile: bool = _f(False, "system", "Compile the model with torch.compile.")
    device: str = _f(
        "auto",
        "system",
        "'auto' (cuda if available, else mps, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps' (Apple GPU).",
        # Exactly what minilm.distributed.local_device resolves. Checked here so that a typo such as
        # 'gpu' is a ConfigError naming the field when the config loads, not a torch RuntimeError at
        # the start of training. torch itself rejects 'cuda:01', hence no leading zeros in N.
        pattern=r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?",
        pattern_help="one of 'auto', 'cpu', 'cuda', 'cuda:N' with N a GPU index (0, 1, ...), or 'mps' (Apple GPU)",
    )
    output_dir: str = _f("outputs", "system", "Where checkpoints, logs and the tokenizer are written.")

    def __post_init__(self) -> None:
        validate(self)

    # ------------------------------------------------------------------------------------
    @property
    def ff_width(self) -> int:
        """The MLP hidden width actually used (``d_ff`` or 4 * d_model)."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def precision(self) -> str:
        """The precision asked for: 'bf16', 'fp16' or 'fp32' (what runs also depends on the hardware)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def precision_label(self) -> str:
        """'bf16 autocast', 'fp16 autocast' or 'fp32': the precision asked for, in words."""
        return "fp32" if self.precision == "fp32" else f"{self.precision} autocast"

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all processes."""
        return self.batch_size * self.grad_accumulation_steps * self.world_size * self.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed; raises :class:`ConfigError` naming a bad or unknown field."""
        for key in changes:
            if key not in FIELDS:
                raise ConfigError(f"replace: {_unknown_key_message(key)}")
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON (the same flat format :func:`load_config` reads)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Fields that fix the network's shape or its token ids: a checkpoint only fits a config that agrees.
SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "max_seq_len",
    "bias",
    "tie_embeddings",
    "activation",
    "tokenizer",
    "dataset",
    "val_fraction",
)

FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def field_type(name: str) -> type:
    """The base Python type of a field (``int`` for ``int | None``)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def field_nullable(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


def _describe_allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[field_type(f.name)]
    parts = [kind]
    if "choices" in m:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    if "pattern" in m:
        return m["pattern_help"]
    if "minimum" in m and "maximum" in m:
        parts.append(f"from {m['minimum']} to {m['maximum']}")
    elif "minimum" in m:
        parts.append(f">= {m['minimum']}")
    elif "exclusive_minimum" in m:
        parts.append(f"> {m['exclusive_minimum']}")
        if "maximum" in m:
            parts.append(f"and <= {m['maximum']}")
    if field_nullable(f.name):
        parts.append("or null")
    return " ".join(parts)


def check_field(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is not allowed for field ``name`` (type, limits, choices)."""
    f = FIELDS[name]
    m = f.metadata
    want = field_type(name)
    if value is None:
        if field_nullable(name):
            return
        raise ConfigError(f"field '{name}' must be {_describe_allowed(f)}, got null")
    # bool is a subclass of int in Python: reject True where an int is wanted, and 1 where a bool is.
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"field '{name}' must be {_describe_allowed(f)}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"field '{name}' must be finite, got {value!r}")
    bad = (
        ("choices" in m and value not in m["choices"])
        or ("pattern" in m and re.fullmatch(m["pattern"], value) is None)
        or ("minimum" in m and value < m["minimum"])
        or ("maximum" in m and value > m["maximum"])
        or ("exclusive_minimum" in m and value <= m["exclusive_minimum"])
    )
    if bad:
        raise ConfigError(f"field '{name}' must be {_describe_allowed(f)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first field that is not allowed."""
    for name in FIELDS:
        check_field(name, getattr(cfg, name))
    if cfg.d_model % cfg.n_heads != 0:
        raise ConfigError(
            f"field 'n_heads' must divide d_model: d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads} "
            f"(allowed n_heads: {', '.join(str(h) for h in _divisors(cfg.d_model, 64))})"
        )
    if cfg.fp16 and cfg.bf16:
        raise ConfigError("fields 'fp16' and 'bf16' are both true: choose at most one mixed-precision mode")
    if cfg.warmup_steps > cfg.max_steps:
        raise ConfigError(f"field 'warmup_steps' ({cfg.warmup_steps}) must be <= max_steps ({cfg.max_steps})")
    _check_size(cfg)


# No machine minilm runs on holds a model this large (4 TB of fp32 weights alone): a config
# beyond it is a typo (d_model 1000000000), refused before anything is allocated.
MAX_PARAMETERS = 10**12


def _check_size(cfg: Config) -> None:
    from minilm.counting import count_parameters  # counting imports config; import late

    n = count_parameters(cfg).total
    if n > MAX_PARAMETERS:
        raise ConfigError(
            f"the model would have {n:,.4g} parameters ({4 * n / 1e12:,.4g} TB of fp32 weights), more than "
            f"minilm's limit of {MAX_PARAMETERS:,}: check d_model ({cfg.d_model}), n_layers ({cfg.n_layers}), "
            f"d_ff ({cfg.d_ff}), vocab_size ({cfg.vocab_size}) and max_seq_len ({cfg.max_seq_len})"
        )


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


# ---------------------------------------------------------------------------------------
# Reading values from JSON and from the command line
# ---------------------------------------------------------------------------------------
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def _count_parts(text: str) -> tuple[str, int]:
    """The digits (without ',' and '_') and the suffix's multiplier of a human count."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([KMBGT]?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a count like '124M', '1.3B' or '33936384': {text!r}")
    return m.group(1).replace(",", "").replace("_", ""), _SUFFIX[m.group(2)]


def parse_count(text: str) -> int:
    """Parse a human parameter count: ``'124M'`` -> 124_000_000, ``'1.3B'`` -> 1_300_000_000.

    A fraction left over is rounded (``'1.2345K'`` -> 1234): right for a label such as
    ``estimated_parameters``; :func:`count_value` gives the exact value instead.
    """
    digits, multiplier = _count_parts(text)
    return round(float(digits) * multiplier)


def count_value(text: str) -> Decimal:
    """The exact value a human count spells, not rounded: ``'33.9M'`` -> 33900000, ``'2.5'`` -> 2.5.

    Decimal, not float: ``float('33.9') * 10**6`` is 33899999.999999996, and a long fraction
    such as ``'12.000000000000001'`` would vanish in a float.
    """
    digits, multiplier = _count_parts(text)
    return Decimal(digits) * multiplier


def _coerce(name: str, value: Any) -> Any:
    """JSON allows a few spellings the dataclass does not: '124M' counts, integral floats."""
    if name == "estimated_parameters" and isinstance(value, str):
        try:
            return parse_count(value)
        except ValueError as e:
            raise ConfigError(f"field 'estimated_parameters': {e}") from None
    if field_type(name) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{key}'{hint} (valid fields: {', '.join(FIELDS)})"


def config_from_dict(values: dict[str, Any], *, source: str = "<dict>", check_estimate: bool = True) -> Config:
    """Build a validated :class:`Config` from a flat mapping; errors name ``source`` and the field."""
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"{source}: {_unknown_key_message(key)}")
        try:
            kwargs[key] = _coerce(key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        cfg = Config(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if check_estimate:
        check_estimated_parameters(cfg, source=source)
    return cfg


def check_estimated_parameters(cfg: Config, *, source: str = "config", tolerance: float = 0.10) -> int | None:
    """Warn when the stated ``estimated_parameters`` is off by more than ``tolerance``.

    Returns the true parameter count when an estimate was stated, else None.
    """
    if cfg.estimated_parameters is None:
        return None
    true = count_parameters(cfg).total
    stated = cfg.estimated_parameters
    if abs(stated - true) > tolerance * true:
        warnings.warn(
            f"{source}: estimated_parameters states {stated:,} but the model has {true:,} parameters "
            f"(off by {(stated - true) / true:+.1%}); run minilm.counting.count_parameters(cfg) for the breakdown",
            ParameterEstimateWarning,
            stacklevel=3,
        )
    return true


CONFIGS_ENV = "MINILM_CONFIGS"


def configs_dir() -> Path:
    """The folder holding the shipped configs (``training/``, ``design_original/``).

    ``$MINILM_CONFIGS`` when set; else the copy installed with the package (package data);
    else the ``configs/`` folder of the checkout this module was imported from. Notebooks use
    it instead of ``../configs`` so they run from any folder (a grading tree, Colab).
    """
    if os.environ.get(CONFIGS_ENV):
        return Path(os.environ[CONFIGS_ENV])
    installed = Path(__file__).parent / "configs"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "configs"


def config_path(name: str | Path) -> Path:
    """The file of a shipped config, by short name or relative path.

    ``"tiny"``, ``"tiny_model"`` and ``"training/tiny_model.json"`` all name
    ``configs/training/tiny_model.json``; ``"design_original/small_model.json"`` names the design's
    copy. An existing file path is returned as it is. Raises :class:`ConfigError` listing the
    shipped names when nothing matches.
    """
    if Path(name).is_file():
        return Path(name)
    root = configs_dir()
    text = str(name).removesuffix(".json")
    for candidate in (text, f"training/{text}", f"training/{text}_model"):
        path = root / f"{candidate}.json"
        if path.is_file():
            return path
    shipped = sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.json"))
    raise ConfigError(f"{name}: no such config in {root} (shipped: {', '.join(shipped) or 'none'})")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *, check_estimate: bool = True) -> Config:
    """Read a flat JSON config, apply ``overrides``, validate, and return a :class:`Config`.

    Raises :class:`ConfigError` (a ``ValueError``) whose message names the file and the field.
    """
    path = Path(path)
    if not path.suffix and not path.exists():  # a short name such as "tiny"
        path = config_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a .json config file") from None
    except OSError as e:  # no permission, an I/O error
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    values = parse_json_object(raw, str(path), what="config file")
    if overrides:
        for key in overrides:
            if key not in FIELDS:
                raise ConfigError(f"override: {_unknown_key_message(key)}")
        values = {**values, **overrides}
    return config_from_dict(values, source=str(path), check_estimate=check_estimate)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: a key given twice is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key '{key}' appears twice (JSON keeps only the last one): delete one of them")
        out[key] = value
    return out


def parse_json_object(raw: bytes, source: str, *, what: str = "file") -> dict[str, Any]:
    """Decode a JSON object from bytes: UTF-8 with or without a byte-order mark, duplicate keys refused.

    Raises :class:`ConfigError` naming ``source`` for another encoding, malformed JSON, a
    duplicated key, or a top-level value that is not an object.
    """
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows Notepad writes one) is dropped
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); re-save the {what} as UTF-8"
        ) from None
    try:
        values = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: malformed JSON (nested too deeply)") from None
    except ValueError as e:  # a number with thousands of digits (Python's int conversion limit)
        raise ConfigError(f"{source}: a number in the file is too long to read ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a JSON object of fields, got {type(values).__name__}")
    return values


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_type(name: str):
    want = field_type(name)

    def convert(text: str) -> Any:
        if field_nullable(name) and text.strip().lower() in ("null", "none"):
            return None
        if name == "estimated_parameters":
            return parse_count(text)
        if want is bool:
            return parse_bool(text)
        return want(text)

    convert.__name__ = want.__name__  # argparse puts this name in its error messages
    return convert


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--<field>`` for every config field; unset ones stay ``None`` (not overridden)."""
    for group_name in ("model", "data", "training", "system", "meta"):
        group = parser.add_argument_group(f"{group_name} fields (override the config file)")
        for name, f in FIELDS.items():
            if f.metadata["group"] != group_name:
                continue
            group.add_argument(
                f"--{name}",
                type=_parser_type(name),
                default=argparse.SUPPRESS,
                metavar=field_type(name).__name__.upper(),
                # argparse %-formats help strings: a literal '%' (e.g. "10%") must be doubled.
                help=f"{f.metadata['help']} Allowed: {_describe_allowed(f)}.".replace("%", "%%"),
            )


def overrides_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    """The config fields a parsed command line set explicitly."""
    return {k: v for k, v in vars(ns).items() if k in FIELDS}


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Parse ``['--learning_rate', '5e-5', '--fp16', 'true']`` into typed overrides.

    Raises :class:`ConfigError` naming the field on a bad value or unknown flag.
    """
    parser = _ErrorRaisingParser(add_help=False, allow_abbrev=False)
    add_config_arguments(parser)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        raise ConfigError(f"override: {_unknown_key_message(flag.lstrip('-').split('=')[0])}")
    return overrides_from_namespace(ns)


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        m = re.search(r"argument --(\w+)", message)
        name = m.group(1) if m else None
        if name in FIELDS:
            raise ConfigError(f"override: field '{name}' must be {_describe_allowed(FIELDS[name])} ({message})")
        raise ConfigError(f"override: {message}")
