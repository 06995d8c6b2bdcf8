"""Data: text -> token ids on disk -> training batches, deterministic and exactly resumable.

    >>> from minilm.data import prepare_data, BatchSampler, eval_batches, unigram_baseline
    >>> tok, train, val = prepare_data(cfg, cache_dir="~/.cache/minilm")  # tokenizer + two memmapped arrays
    >>> sampler = BatchSampler(train, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed, rank=0, world_size=1)
    >>> x, y = sampler.next_batch()         # (B, T) int64 each; y[:, t] is the token after x[:, t]
    >>> state = sampler.state_dict()        # a small dict: save it in the checkpoint ...
    >>> sampler.load_state_dict(state)      # ... and the next batch is exactly the one that was due
    >>> batches = eval_batches(val, cfg.batch_size, cfg.max_seq_len, cfg.eval_batches)  # fixed, same every call
    >>> unigram_baseline(train, val, tok.vocab_size)  # nats/token of "predict by frequency alone"

API
---
- ``load_text(dataset) -> str``: 'shakespeare' (the bundled corpus, ``minilm/data/``), a text
  file (``.txt``, or ``.gz``), or a folder (every ``*.txt`` below it, in path order).
- ``split_text(text, val_fraction) -> (train_text, val_text)``: the last ``val_fraction`` of
  the text, cut at a line break, is validation. Fixed: no randomness.
- ``prepare_data(cfg, cache_dir=None) -> PreparedData(tokenizer, train, val)``: builds (or
  reuses) the tokenizer, tokenizes each split once and caches the ids as raw arrays under
  ``cache_dir`` keyed by the text's hash and the tokenizer's fingerprint; returns read-only
  ``np.memmap`` arrays (uint16 when vocab_size <= 65536, else uint32).
- ``BatchSampler(tokens, batch_size, seq_len, seed, rank=0, world_size=1, num_workers=0,
  pin_memory=False)``: ``next_batch()``, ``get_batch(step)``, iteration, ``state_dict()``,
  ``load_state_dict()``.
- ``eval_batches(tokens, batch_size, seq_len, n, rank=0, world_size=1) -> list[(x, y)]``.
- ``unigram_baseline(train, val, vocab_size) -> float``.

How batches are drawn
---------------------
The training tokens are cut into non-overlapping windows of ``seq_len + 1`` tokens (x and its
shifted target y share all but one), starting at a random phase each epoch. Each epoch visits
every window once, in a random order; the order and phase come from ``(seed, epoch)`` only. The
windows of all epochs form one stream, and *global* batch ``s`` is windows
``s*G .. (s+1)*G - 1`` of it, with ``G = batch_size * world_size``; rank ``r`` takes the
``r``-th slice of ``batch_size`` windows. So a batch is a pure function of its step number:

- resuming needs only the step (``state_dict()`` is ``{"step": ..., ...}``);
- ``world_size`` processes with batch ``b`` see exactly one process's batch ``world_size*b``;
- ``k`` consecutive micro-batches of ``b`` are exactly one batch of ``k*b`` (accumulation);
- background workers (``num_workers > 0``) may prefetch in any order without changing a thing
  (starting them draws from the sampler's own seeded generator, not torch's global RNG).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from minilm.files import write_atomic
from minilm.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from minilm.config import Config

DATA_DIR = Path(__file__).with_name("data")
BUNDLED = {"shakespeare": DATA_DIR / "shakespeare.txt.gz"}  # dataset names that need no path
CACHE_FORMAT = 1  # bump when the cache layout or the tokenisation recipe changes

TokenArray = np.ndarray  # 1-D array of token ids: a read-only np.memmap from prepare_data
Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), each (B, T) int64


class DataError(ValueError):
    """A dataset that cannot be read or is too small for the request; the message says which and why."""


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------
def load_text(dataset: str | Path) -> str:
    """The whole text of a dataset, with Unix line endings.

    ``dataset`` is 'shakespeare' (bundled), a file (UTF-8 text, optionally ``.gz``) or a
    folder, whose ``*.txt`` files (searched recursively, in sorted path order) are joined by
    a blank line.
    """
    if str(dataset) in BUNDLED:
        return _read(BUNDLED[str(dataset)])
    if not str(dataset).strip():
        raise DataError("dataset is empty: give 'shakespeare' (the bundled corpus), a text file or a folder of .txt")
    path = Path(dataset).expanduser()
    if path.is_file():
        text = _read(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"dataset folder '{path}' holds no .txt files")
        text = "\n\n".join(_read(p).strip("\n") for p in files) + "\n"
    else:
        raise DataError(
            f"dataset '{dataset}': no such file or folder. Use 'shakespeare' (the bundled corpus), "
            "a path to a UTF-8 text file, or a folder of .txt files"
        )
    if not text.strip():
        raise DataError(f"dataset '{dataset}' is empty")
    return text


def _read(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except PermissionError:
        raise DataError(f"{path}: no permission to read it; fix its permissions or copy it elsewhere") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid .gz file ({e}); re-compress it, or give the plain text file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a text file") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a byte-order mark if an editor wrote one
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {bad!r}); re-save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation): validation is the last ``val_fraction`` of ``text``, starting at a line."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if 0 <= newline < len(text) - 1:
        cut = newline + 1  # start validation at a line, so no word is split between the two
    train, val = text[:cut], text[cut:]
    if not train or not val:
        raise DataError(f"text of {len(text)} characters is too short to split off val_fraction={val_fraction}")
    return train, val


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Tokens on disk
# ---------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 (2 bytes/token) when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def default_cache_dir() -> Path:
    """``$MINILM_CACHE`` if set, else ``~/.cache/minilm``."""
    return Path(os.environ.get("MINILM_CACHE", "~/.cache/minilm")).expanduser()


class PreparedData(NamedTuple):
    tokenizer: Tokenizer
    train: TokenArray  # training token ids, memory-mapped
    val: TokenArray  # validation token ids, memory-mapped


def prepare_data(cfg: Config, cache_dir: str | Path | None = None) -> PreparedData:
    """Load ``cfg.dataset``, build or reuse the tokenizer, and return the tokenized splits.

    Everything expensive is cached under ``cache_dir`` (default :func:`default_cache_dir`):
    ``tokenizer-<key>/`` (keyed by kind, vocab_size and the hash of the text it learns from)
    and ``tokens-<key>/{train,val}.bin`` (keyed by the text's hash, val_fraction and the
    tokenizer's fingerprint). A second call with the same inputs reads both back in
    milliseconds. Files are written then renamed, so concurrent callers (DDP ranks) cannot
    see half a file; still, letting rank 0 prepare first and the others wait at a barrier
    avoids doing the work several times.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    text = load_text(cfg.dataset)
    text_sha = _sha(text)
    train_text, val_text = split_text(text, cfg.val_fraction)

    # Char: every character needs an id, validation's included. BPE: learn merges on train only.
    tok_text = text if cfg.tokenizer == "char" else train_text
    tok_dir = cache / f"tokenizer-{_sha(str(CACHE_FORMAT), cfg.tokenizer, str(cfg.vocab_size), _sha(tok_text))}"
    try:
        tokenizer = load_tokenizer(tok_dir)
    except ValueError:  # not cached yet (or damaged): build it
        tokenizer = build_tokenizer(cfg, tok_text)
        tokenizer.save(tok_dir)
    if tokenizer.vocab_size > cfg.vocab_size:  # build_tokenizer guarantees this; a stale cache might not
        raise DataError(f"tokenizer has {tokenizer.vocab_size} ids but vocab_size is {cfg.vocab_size}")

    dtype = token_dtype(cfg.vocab_size)
    key = _sha(str(CACHE_FORMAT), text_sha, repr(cfg.val_fraction), tokenizer.fingerprint, dtype.name)
    tok_cache = cache / f"tokens-{key}"
    meta_path = tok_cache / "meta.json"
    meta = _read_cache_meta(meta_path) if meta_path.exists() else None  # None: damaged, rebuilt below
    if meta is None:  # meta.json is written last: present (and readable) means complete
        tok_cache.mkdir(parents=True, exist_ok=True)
        lengths = {}
        for split, split_text_ in (("train", train_text), ("val", val_text)):
            ids = tokenizer.encode_array(split_text_).astype(dtype)
            write_atomic(tok_cache / f"{split}.bin", ids.tobytes())
            lengths[split] = int(ids.size)
        meta = {
            "dataset": str(cfg.dataset),
            "text_sha256_16": text_sha,
            "characters": len(text),
            "val_fraction": cfg.val_fraction,
            "tokenizer": tokenizer.kind,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "tokens": lengths,
        }
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    train, val = (
        np.memmap(tok_cache / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"][split],))
        for split in ("train", "val")
    )
    return PreparedData(tokenizer, train, val)


def _read_cache_meta(meta_path: Path) -> dict[str, Any] | None:
    """The cache's meta.json if it and the token files it describes are whole, else None (then rebuilt).

    The cache is derived data: a damaged entry (garbage, an empty file, a token file of the
    wrong size, a hand edit) is rebuilt from the text with a warning, never trusted or fatal.
    """
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8-sig"))
        dtype = np.dtype(meta["dtype"])
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"dtype {dtype}")
        for split in ("train", "val"):
            n = meta["tokens"][split]
            size = (meta_path.parent / f"{split}.bin").stat().st_size
            if not isinstance(n, int) or n < 0 or size != n * dtype.itemsize:
                raise ValueError(f"{split}.bin holds {size} bytes, not {n} tokens")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        warnings.warn(f"{meta_path}: damaged token cache ({e}); rebuilding it", UserWarning, stacklevel=3)
        return None


# ---------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------
def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """Gather windows tokens[s : s + seq_len + 1] for each start s -> (x, y), (len(starts), seq_len) int64."""
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]  # y is x shifted left by one: the next token at each position
    return x.contiguous(), y.contiguous()


class BatchSampler:
    """Random training batches from a token array: deterministic, resumable, split across ranks.

    Args:
        tokens: 1-D token ids (the ``train`` array of :func:`prepare_data`).
        batch_size: sequences per batch *on this rank* (the config's per-device batch_size).
        seq_len: tokens per sequence (the config's max_seq_len).
        seed: fixes the order; the same seed gives the same batches on every machine.
        rank, world_size: this process's share of each global batch of ``batch_size * world_size``.
        num_workers: background processes that prepare batches ahead (0: in this process).
        pin_memory: return page-locked tensors for faster host-to-GPU copies (only with CUDA).

    ``step`` counts the batches this sampler has returned; ``get_batch(step)`` is a pure
    function of (seed, step, global batch, seq_len, tokens). See the module docstring.
    """

    def __init__(
        self,
        tokens: TokenArray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        n_windows = (len(tokens) - seq_len) // seq_len  # windows of seq_len+1 at any phase 0..seq_len-1
        if n_windows < 1:
            raise DataError(
                f"{len(tokens)} tokens are too few for one training sequence of seq_len={seq_len} "
                f"(need at least {2 * seq_len}); use more text or a smaller max_seq_len"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs an accelerator
        self.n_windows = n_windows
        self.step = 0
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}  # epoch -> (phase, window order), 2 kept
        self._loader: Iterator | None = None

    @property
    def global_batch(self) -> int:
        """Sequences per step across all ranks."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> float:
        """Passes over the training windows so far (fractional)."""
        return self.step * self.global_batch / self.n_windows

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])  # independent stream per (seed, epoch)
            phase = int(rng.integers(self.seq_len))
            order = rng.permutation(self.n_windows)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}  # keep the previous one
            self._epochs[epoch] = (phase, order)
        return self._epochs[epoch]

    def window_starts(self, step: int) -> np.ndarray:
        """Token offsets of this rank's ``batch_size`` windows at ``step``."""
        first = step * self.global_batch + self.rank * self.batch_size  # position in the window stream
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i, k in enumerate(range(first, first + self.batch_size)):
            epoch, j = divmod(k, self.n_windows)
            phase, order = self._epoch_order(epoch)
            starts[i] = phase + order[j] * self.seq_len
        return starts

    def get_batch(self, step: int) -> Batch:
        """This rank's (x, y) at ``step``, each (batch_size, seq_len) int64; does not move the sampler."""
        x, y = self._unpinned_batch(step)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _unpinned_batch(self, step: int) -> Batch:
        # Workers call this: a forked worker must never touch CUDA (pinning there fails with
        # "CUDA error: initialization error"); the DataLoader pins in the main process instead.
        return _windows(self.tokens, self.window_starts(step), self.seq_len)

    def next_batch(self) -> Batch:
        """The batch at ``self.step``; then advance one step."""
        if self.num_workers > 0:
            if self._loader is None:
                self._loader = iter(self._make_loader(self.step))
            step, x, y = next(self._loader)
            assert step == self.step, "background loader out of step"
        else:
            x, y = self.get_batch(self.step)
        self.step += 1
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        """Endless ``next_batch()``; stop with ``itertools.islice`` or a step budget."""
        while True:
            yield self.next_batch()

    def _make_loader(self, start: int) -> torch.utils.data.DataLoader:
        # Batches are a pure function of the step, so workers may run ahead freely; the
        # loader is rebuilt from self.step whenever the position jumps (load_state_dict).
        # Workers never tokenize: tell the tokenizers library so it does not warn about the fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return torch.utils.data.DataLoader(
            _StepDataset(self),
            batch_size=None,  # the dataset already returns whole batches
            sampler=itertools.count(start),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Starting the workers draws their base seed from this generator; without one it comes
            # from torch's global RNG, which also draws dropout masks, so workers (and every resume,
            # which starts them anew) would change the masks. The workers draw nothing random.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def close(self) -> None:
        """Stop background workers (they also stop when the sampler is garbage-collected)."""
        self._loader = None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: a few integers."""
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. The global batch may change if the position stays whole.

        Raises ValueError, naming the config field, when ``state`` belongs to another stream of
        windows (seed, sequence length or token count differ) or the sequences consumed so far are
        not a whole number of this sampler's global batches.
        """
        # The window order depends on these: a position in one stream means nothing in another.
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint was trained with seed {state['seed']} but this run has seed {self.seed}; resume "
                f"with the same seed (--seed {state['seed']}) or start a new run (the seed fixes the data order)"
            )
        if state["seq_len"] != self.seq_len:
            raise ValueError(
                f"the checkpoint was trained with max_seq_len {state['seq_len']} but this run has {self.seq_len}; "
                "resume with the same max_seq_len or start a new run"
            )
        if state["n_tokens"] != len(self.tokens):
            raise ValueError(
                f"the checkpoint was trained on {state['n_tokens']:,} training tokens but this data has "
                f"{len(self.tokens):,}; resume with the dataset, tokenizer and val_fraction it was trained with"
            )
        windows = state["step"] * state["global_batch"]  # windows consumed so far, across ranks
        if windows % self.global_batch:
            raise ValueError(
                f"cannot resume: the checkpoint consumed {windows} sequences, not a whole number of this run's "
                f"global batches of {self.global_batch} (batch_size {self.batch_size} x world_size "
                f"{self.world_size}); use a batch_size x world_size that divides {windows}, such as the "
                f"checkpoint's {state['global_batch']}"
            )
        self.step = windows // self.global_batch
        self._loader = None


class _StepDataset(torch.utils.data.Dataset):
    """Map-style view of a sampler for DataLoader workers: item ``step`` is (step, x, y)."""

    def __init__(self, sampler: BatchSampler):
        self.sampler = sampler

    def __getitem__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        x, y = self.sampler._unpinned_batch(step)
        return step, x, y

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get a pickled copy: send the memmap's file name, not its contents.
        state = dict(self.sampler.__dict__, _loader=None, _epochs={})  # orders are cheap to redo
        tokens = state["tokens"]
        if isinstance(tokens, np.memmap) and tokens.filename:
            state["tokens"] = ("memmap", tokens.filename, tokens.dtype.str, tokens.shape, tokens.offset)
        return {"sampler_state": state}

    def __setstate__(self, d: dict[str, Any]) -> None:
        state = d["sampler_state"]
        if isinstance(state["tokens"], tuple):
            _, filename, dtype, shape, offset = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.sampler = BatchSampler.__new__(BatchSampler)
        self.sampler.__dict__.update(state)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def eval_batches(
    tokens: TokenArray, batch_size: int, seq_len: int, n: int, rank: int = 0, world_size: int = 1
) -> list[Batch]:
    """``n`` fixed validation batches, the same on every call: windows spread evenly over ``tokens``.

    With ``world_size > 1`` each rank gets its slice of each global batch (as in
    :class:`BatchSampler`), so the mean of the ranks' losses is the single-process loss.
    When ``tokens`` is shorter than ``n * batch_size * world_size`` windows, windows overlap.
    """
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"validation has {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len} + 1; "
            "raise val_fraction, use more text or a smaller max_seq_len"
        )
    g = batch_size * world_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * g).round().astype(np.int64)
    return [
        _windows(tokens, starts[i * g + rank * batch_size : i * g + (rank + 1) * batch_size], seq_len) for i in range(n)
    ]


def unigram_baseline(train: TokenArray, val: TokenArray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of a unigram model fit on ``train``.

    The model predicts every token by its training frequency, ignoring context (add-one
    smoothing, so unseen ids cost finite loss). A language model that has learned anything
    about context gets below this; one that has not sits at it. For reference, a uniform
    guess costs ln(vocab_size).
    """
    counts = _bincount(train, vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    val_counts = _bincount(val, vocab_size)
    return float(-(val_counts * log_p).sum() / val_counts.sum())


def _bincount(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.float64)
    for i in range(0, len(tokens), chunk):  # in chunks: a memmap of a billion tokens stays on disk
        counts += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab_size)[:vocab_size]
    return counts
