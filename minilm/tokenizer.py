"""Tokenizers: text <-> integer ids, character-level or byte-level BPE.

Two kinds, one interface (:class:`Tokenizer`):

- :class:`CharTokenizer`: one id per distinct character of the text it was built from,
  in code-point order. Tiny vocabularies (Shakespeare has 84 characters), so a lesson
  model spends its parameters on the network rather than on embeddings.
- :class:`BPETokenizer`: byte-level BPE (GPT-2's scheme) trained with the Hugging Face
  ``tokenizers`` library to a chosen vocabulary size. Its first 256 ids cover every byte,
  so it encodes *any* string and ``decode(encode(s)) == s`` always holds.

    >>> from minilm.tokenizer import build_tokenizer, load_tokenizer
    >>> tok = build_tokenizer(cfg, text)        # cfg.tokenizer: 'char' | 'bpe'; fits cfg.vocab_size
    >>> ids = tok.encode("To be, or not to be")  # list[int]
    >>> tok.decode(ids)
    'To be, or not to be'
    >>> tok.save("outputs/tiny/checkpoint-600")  # a checkpoint decodes the same way ...
    >>> tok = load_tokenizer("outputs/tiny/checkpoint-600")  # ... after loading it back

Saving writes ``minilm_tokenizer.json`` (kind and vocabulary; for BPE also the Hugging Face
``tokenizer.json``, which ``tokenizers.Tokenizer.from_file`` reads directly).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minilm.files import write_atomic

if TYPE_CHECKING:
    from minilm.config import Config

META_FILE = "minilm_tokenizer.json"  # what load_tokenizer reads first
HF_FILE = "tokenizer.json"  # the BPE model in the Hugging Face tokenizers format
BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, saved, loaded or applied; the message says why."""


class Tokenizer(ABC):
    """Common interface of the tokenizers: encode, decode, vocab_size, save."""

    kind: str  # 'char' or 'bpe', as in Config.tokenizer

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids this tokenizer produces: ids are 0 .. vocab_size - 1."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> token ids."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the tokenizer into ``directory`` (created if missing); :func:`load_tokenizer` reads it."""

    @abstractmethod
    def _identity(self) -> str:
        """A string that changes whenever the id mapping changes (hashed into cache keys)."""

    def encode_array(self, text: str) -> np.ndarray:
        """Text -> 1-D int64 array of ids. Same ids as :meth:`encode`, faster on long texts."""
        return np.asarray(self.encode(text), dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        """Short hash of the id mapping: two tokenizers with the same fingerprint encode alike."""
        return hashlib.sha256(self._identity().encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


# ---------------------------------------------------------------------------------------
# Character level
# ---------------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """One id per character; ``chars`` lists the vocabulary, id i is ``chars[i]``."""

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise TokenizerError("CharTokenizer: the character list has duplicates")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        # For encode_array: code points in sorted order and the id of each.
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codes)
        self._sorted_codes = codes[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary is every distinct character of ``text``, in code-point order."""
        if not text:
            raise TokenizerError("cannot build a character tokenizer from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise self._unknown(e.args[0]) from None

    def encode_array(self, text: str) -> np.ndarray:
        # Vectorised: UTF-32 gives one code point per element; binary-search each in the vocabulary.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, codes).clip(max=len(self.chars) - 1)
        missing = self._sorted_codes[pos] != codes
        if missing.any():
            raise self._unknown(chr(codes[np.argmax(missing)]))
        return self._order[pos]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]  # accepts tensors and numpy arrays too
        bad = [i for i in ids if not 0 <= i < len(self.chars)]  # (a negative index would wrap around)
        if bad:
            raise TokenizerError(f"id {bad[0]} is outside this character vocabulary (0..{len(self.chars) - 1})")
        return "".join(self.chars[i] for i in ids)

    def _unknown(self, char: str) -> TokenizerError:
        return TokenizerError(
            f"character {char!r} (U+{ord(char):04X}) is not in this character tokenizer's vocabulary "
            f"of {len(self.chars)} characters (it was built from a text without it); use tokenizer='bpe', "
            "which encodes any text"
        )

    def save(self, directory: str | Path) -> None:
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}
        _write_json(Path(directory) / META_FILE, meta)

    def _identity(self) -> str:
        return "char:" + self.chars


# ---------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------
class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by a ``tokenizers.Tokenizer`` (GPT-2 pre-tokenisation, no special tokens)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):  # a tokenizers.Tokenizer
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges on ``text`` until ``vocab_size`` tokens (or no pair occurs ``min_frequency`` times).

        Deterministic: ties between equally frequent pairs are broken by token ids, which
        are themselves fixed by byte order. A few seconds for the 5 MB Shakespeare corpus.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < BYTE_ALPHABET:
            raise TokenizerError(
                f"byte-level BPE needs vocab_size >= {BYTE_ALPHABET} (one token per byte), got {vocab_size}; "
                "raise vocab_size or use tokenizer='char'"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(_safe_chunks(text), trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        # encode_batch runs the chunks on all cores; cutting only where the pre-tokeniser cuts
        # anyway (see _safe_chunks) gives exactly the ids of one encode() call.
        encodings = self.hf.encode_batch(_safe_chunks(text))
        return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"id {bad[0]} is outside this BPE vocabulary (0..{self.vocab_size - 1})")
        return self.hf.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / HF_FILE, self.hf.to_str(pretty=True))
        _write_json(directory / META_FILE, {"kind": self.kind, "vocab_size": self.vocab_size, "file": HF_FILE})

    def _identity(self) -> str:
        return "bpe:" + self.hf.to_str()


# A cut right after "<visible char>\n" and before a visible char is a cut the GPT-2
# pre-tokeniser makes anyway ("\n" is then a token of its own), so chunks encode exactly like
# the whole. Visible ASCII only: no doubt about what counts as whitespace.
_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


def _safe_chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split ``text`` into pieces of about ``size`` characters at pre-tokeniser boundaries."""
    chunks, start = [], 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size)
        if m is None:
            break
        chunks.append(text[start : m.start()])
        start = m.start()
    chunks.append(text[start:])
    return chunks


# ---------------------------------------------------------------------------------------
# Factory, save and load
# ---------------------------------------------------------------------------------------
def build_tokenizer(cfg: Config, text: str) -> Tokenizer:
    """Build the tokenizer ``cfg.tokenizer`` names from ``text``, fitting ``cfg.vocab_size``.

    'char': the characters of ``text`` (pass all of it, validation included, so every
    character has an id); raises :class:`TokenizerError` if there are more than vocab_size.
    'bpe': byte-level BPE trained on ``text`` to at most vocab_size tokens (fewer when the
    text runs out of pairs worth merging; the model may have more ids than the tokenizer uses).
    """
    if cfg.tokenizer == "char":
        tok = CharTokenizer.from_text(text)
        if tok.vocab_size > cfg.vocab_size:
            raise TokenizerError(
                f"the text has {tok.vocab_size} distinct characters but vocab_size is {cfg.vocab_size}: "
                f"set vocab_size >= {tok.vocab_size}, or use tokenizer='bpe'"
            )
        return tok
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(text, cfg.vocab_size)
    raise TokenizerError(f"unknown tokenizer {cfg.tokenizer!r}: expected 'char' or 'bpe'")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read a tokenizer written by :meth:`Tokenizer.save`; a clear error if it is missing or damaged."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
        if kind == "char":
            tok: Tokenizer = CharTokenizer(meta["chars"])
        elif kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            tok = BPETokenizer(HFTokenizer.from_file(str(directory / meta["file"])))
        else:
            raise TokenizerError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    except FileNotFoundError as e:
        raise TokenizerError(f"no saved tokenizer in {directory} ({Path(e.filename).name} is missing)") from None
    except TokenizerError:
        raise
    except Exception as e:  # malformed JSON, missing keys, a damaged tokenizer.json
        raise TokenizerError(f"{directory}: the saved tokenizer is damaged ({type(e).__name__}: {e})") from None
    if tok.vocab_size != meta.get("vocab_size"):
        raise TokenizerError(f"{directory}: saved vocab_size {meta.get('vocab_size')} != loaded {tok.vocab_size}")
    return tok


def _write_json(path: Path, obj: dict) -> None:
    """Write then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
