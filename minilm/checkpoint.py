"""Checkpoints that a run can resume from exactly, written so that a crash never loses the last one.

A checkpoint is a folder ``output_dir/checkpoint-N`` (N = optimizer steps taken)::

    checkpoint-600/
        model.safetensors   model weights in safetensors (no pickle: loading runs no code; never with
                            torch.compile's ``_orig_mod.`` prefix). Checkpoints written before hold model.pt.
        training_state.pt   optimizer, gradient scaler, step, RNG states, data-sampler position
        config.json         the run's Config, readable by minilm.config.load_config
        tokenizer/          the tokenizer, so the checkpoint decodes exactly as it was trained
        manifest.json       size and SHA-256 of every file, written last: a folder without it is not a checkpoint

A *sharded* checkpoint (FSDP with several processes, :mod:`minilm.sharded_checkpoint`) holds
``dcp/`` (one file per rank and DCP's index) in place of ``model.safetensors``; listing,
``latest``, rotation, checksums and loading treat both kinds alike.

**Checksums.** Loading compares every file with the manifest's SHA-256 and names the one that
differs (a flipped bit on disk, a partial copy), so damaged weights are never trained on or
sampled from. :func:`latest_checkpoint` takes the newest checkpoint that verifies and warns
about each newer one it skipped.

**Atomic writes.** Everything is written into a hidden temporary folder next to the
target, each file is fsync'ed, and only then is the folder renamed to ``checkpoint-N``.
A rename within one file system is atomic, so a process killed at any moment leaves
either the complete new checkpoint or none at all; older checkpoints are untouched.
Re-saving an existing step first moves the old folder aside (``.old-checkpoint-N``): a kill
between that and the final rename leaves only the old one, which the next listing, load or
save renames back. A checkpoint that rotation (``save_total_limit``) removes first leaves by one
rename, into a hidden ``.trash-`` name, and only then are its files deleted: a kill during the
delete never leaves a half-deleted ``checkpoint-N`` behind. :func:`clean_output_dir` removes such
leftovers when a run starts.

**Safe loading.** Every ``torch.load`` uses ``weights_only=True``, which refuses to run
pickled code: RNG states and counters are stored as tensors and plain Python values.
A missing, incomplete or corrupt checkpoint raises :class:`CheckpointError` naming the
path and what is wrong.

    >>> from minilm.checkpoint import load_checkpoint, latest_checkpoint
    >>> ckpt = load_checkpoint(latest_checkpoint("outputs/tiny"))
    >>> ckpt.step, ckpt.config.d_model
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from minilm.config import SHAPE_FIELDS, Config, ConfigError, config_from_dict, parse_json_object

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # checkpoints written before safetensors: still loaded (weights_only=True)
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"
SHARDED_DIR = "dcp"  # a sharded checkpoint's weights and AdamW moments, one file per rank (minilm.sharded_checkpoint)
SHARDED_INDEX = f"{SHARDED_DIR}/.metadata"  # DCP's index of those files: present in every sharded checkpoint
FORMAT_VERSION = 2  # 2: safetensors weights, SHA-256 per file; 1: model.pt, sizes only

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_OLD_PREFIX = ".old-checkpoint-"
_OLD_RE = re.compile(r"^\.old-checkpoint-(\d+)$")
_TRASH_PREFIX = ".trash-"
_ALIASES_KEY = "minilm_aliases"  # safetensors metadata: tied weights, stored once


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


class CheckpointWarning(UserWarning):
    """A checkpoint skipped by :func:`latest_checkpoint`, or debris cleaned from an output_dir."""


# ---------------------------------------------------------------------------------------
# State-dict hygiene
# ---------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the key prefixes that torch.compile (``_orig_mod.``) and DDP (``module.``) add.

    Checkpoints always hold the plain model's keys, so a compiled run loads into an
    uncompiled model and vice versa.
    """
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# RNG states as tensors and plain values (so that weights_only=True can load them)
# ---------------------------------------------------------------------------------------
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if CUDA is in use) CUDA generator states, as tensors and plain types.

    The CUDA state is that of ``device`` only (a CUDA device; default: the current one), the GPU
    this process trains on. Under DDP every rank seeds alike and draws the same dropout masks
    (see the trainer), so rank 0's GPU state is every rank's: :func:`set_rng_state` puts it back
    on each rank's own GPU. (Saving every GPU's state from rank 0 and restoring them all would
    give rank r the untouched state of cuda:r, which only rank 0's process holds.)
    """
    version, mt, gauss = random.getstate()
    # NumPy's legacy global generator: minilm draws from its own seeded Generators, but user
    # code in a notebook may use np.random.*, and resuming should not change what it gets.
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(_cuda_device(device))
    return state


def _cuda_device(device: torch.device | None) -> torch.device:
    """``device`` if it is a CUDA device, else the current CUDA device (a training run passes its own)."""
    if device is not None and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned; its CUDA state goes onto ``device`` (default: the current one)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np_state = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(np_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], _cuda_device(device))


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new file in ``path`` durable; some systems cannot open folders.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tree_durably(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _torch_save(obj: Any, path: Path) -> None:
    """One place where tensors go to disk (tests slow it down to kill a save half-way)."""
    torch.save(obj, path)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors. Tied weights (one tensor under two names) are stored once.

    safetensors refuses tensors that share memory; the second name of a tied weight is recorded
    in the file's metadata instead (``{"lm_head.weight": "wte.weight"}``) and restored on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()))
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    _torch_save_weights(tensors, path, {_ALIASES_KEY: json.dumps(aliases)})


def _torch_save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # One place where weights go to disk (tests replace it to fail or stall a save).
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_weights` (safetensors: no pickle is involved)."""
    device = str(map_location)
    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        for alias, target in aliases.items():
            state[alias] = state[target]
    except Exception as e:  # a truncated or overwritten file; bad metadata
        raise CheckpointError(f"{path}: corrupt or unreadable weights file ({_first_line(e)})") from None
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    config: Config,
    tokenizer: Any | None = None,
    save_total_limit: int = 0,
    stale_steps: Collection[int] = (),
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically and return its path.

    ``model_state`` is the model's state dict (wrapper prefixes are stripped here too);
    ``training_state`` holds the optimizer / scaler state dicts, RNG states and sampler
    position, as tensors and plain Python values only. ``tokenizer`` needs a
    ``save(folder)`` method. ``save_total_limit`` > 0 then deletes the oldest
    checkpoints so that at most that many remain (see :func:`rotate_checkpoints`: the one
    written now is never deleted, and the ``stale_steps`` of a replaced run go first).
    """
    tmp = new_checkpoint_folder(output_dir, step)
    with removed_on_failure(tmp), write_errors(checkpoint_path(output_dir, step)):
        save_weights(clean_state_dict(model_state), tmp / MODEL_FILE)
        write_state_files(tmp, step, training_state, config, tokenizer)
    return publish_checkpoint(tmp, step, save_total_limit=save_total_limit, stale_steps=stale_steps)


def new_checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """A new hidden temporary folder in ``output_dir``; :func:`publish_checkpoint` renames it ``checkpoint-{step}``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=output_dir))


@contextlib.contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """Delete the temporary folder ``tmp`` if the block raises (a kill leaves it to :func:`clean_output_dir`)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def write_errors(final: Path) -> Iterator[None]:
    """Turn what a full disk raises while ``final`` is being written into one :class:`CheckpointError`."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, safetensors.SafetensorError) as e:
        # A full disk reaches us as OSError from Python, RuntimeError from torch.save
        # ("file write failed") or SafetensorError: one message for all three.
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({_first_line(e)}); a full disk is the usual cause: "
            "free space or choose another --output_dir (the checkpoints already saved are intact)"
        ) from None


def write_state_files(
    folder: Path, step: int, training_state: dict[str, Any], config: Config, tokenizer: Any | None
) -> None:
    """Everything of a checkpoint but its weights: ``training_state.pt``, ``config.json`` and ``tokenizer/``."""
    _torch_save({"format_version": FORMAT_VERSION, "step": step, **training_state}, folder / STATE_FILE)
    config.save(folder / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_DIR)


def publish_checkpoint(tmp: Path, step: int, *, save_total_limit: int = 0, stale_steps: Collection[int] = ()) -> Path:
    """Checksum every file of the finished temporary folder ``tmp``, then rename it to ``checkpoint-{step}``.

    The manifest (size and SHA-256 of every file, sharded checkpoints' shards included) is written
    last, every file is fsync'ed, and one rename makes the checkpoint appear whole; then debris is
    cleaned and ``save_total_limit`` applied (:func:`rotate_checkpoints`). One process calls it.
    """
    output_dir = tmp.parent
    final = checkpoint_path(output_dir, step)
    with removed_on_failure(tmp):
        with write_errors(final):
            files = {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            _write_tree_durably(tmp)
        _rename_into_place(tmp, final)
        _fsync_dir(output_dir)
    _restore_moved_aside(output_dir)  # before the clean-up, which would delete it
    _remove_stale_temporaries(output_dir, keep=final)
    if save_total_limit > 0:
        rotate_checkpoints(output_dir, save_total_limit, newest=final, stale_steps=stale_steps)
    return final


def _rename_into_place(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final``; an existing ``final`` (the same step saved again) is moved aside first."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # Re-saving the same step (e.g. after a resume): move the old one aside first,
    # since a folder cannot be renamed over a non-empty folder.
    old = final.parent / f"{_OLD_PREFIX}{checkpoint_step(final)}"
    if old.exists():
        discard(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        # Between the two renames another process listed the folder and put the old one back
        # (see _restore_moved_aside): move it aside again.
        if not final.exists():
            raise
        os.replace(final, old)
        os.replace(tmp, final)
    discard(old)


def discard(path: Path) -> None:
    """Delete a checkpoint folder so that no kill leaves half of it under its own name.

    One rename moves it to a hidden ``.trash-`` name (atomic), then its files are deleted. A kill
    during the delete leaves only trash, which :func:`clean_output_dir` removes; never a
    ``checkpoint-N`` that lost some files but kept its manifest.
    """
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return  # already gone
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(output_dir: Path, keep: Path | None = None) -> list[Path]:
    """Delete what killed saves and deletes left behind (never a finished checkpoint); returns what went."""
    removed = []
    for p in output_dir.iterdir():
        debris = p.name.startswith((_TMP_PREFIX, _OLD_PREFIX, _TRASH_PREFIX))
        if debris and p != keep:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def clean_output_dir(output_dir: str | Path) -> list[str]:
    """Tidy an output_dir before a run writes to it; returns one notice per thing done (empty: nothing to do).

    Puts back a checkpoint that a killed re-save had moved aside, and deletes the temporary
    folders of killed saves and the trash of killed deletes. Call it only when no other
    process writes there (the run lock, :mod:`minilm.runs`, sees to that).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    before = {p.name for p in output_dir.iterdir()}
    _restore_moved_aside(output_dir)
    restored = sorted(n for n in {p.name for p in output_dir.iterdir()} - before)
    notices = [f"restored {output_dir / n}, moved aside by a re-save that was interrupted" for n in restored]
    removed = _remove_stale_temporaries(output_dir)
    if removed:
        notices.append(
            f"removed {len(removed)} leftover(s) of interrupted saves or deletes in {output_dir}: "
            + ", ".join(p.name for p in removed)
        )
    return notices


def _restore_moved_aside(output_dir: Path) -> None:
    """Rename ``.old-checkpoint-N`` back to ``checkpoint-N`` where a killed re-save left only the former.

    Re-saving step N moves the old ``checkpoint-N`` aside, then renames the new one into place.
    A kill between those two renames leaves ``.old-checkpoint-N`` (complete) and no
    ``checkpoint-N``: it is still the last good checkpoint N, not debris to delete.
    """
    for p in output_dir.iterdir():
        m = _OLD_RE.match(p.name)
        final = checkpoint_path(output_dir, int(m.group(1))) if m else None
        if final is not None and not final.exists() and (p / MANIFEST_FILE).is_file():
            try:
                os.replace(p, final)
            except OSError:
                pass  # a read-only folder (then list_checkpoints just misses it), or another process was faster


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) in ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    _restore_moved_aside(output_dir)
    found = []
    for p in output_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint in ``output_dir`` that is complete and verifies, [(newer one skipped, why)]).

    Folders named ``checkpoint-N`` without a manifest (a save interrupted by an older minilm, a
    copy in progress) count as skipped too; a damaged checkpoint is never picked.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, []
    _restore_moved_aside(output_dir)
    named = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    skipped: list[tuple[Path, str]] = []
    for _, p in named:
        try:
            check_checkpoint(p, verify=True)
        except CheckpointError as e:
            skipped.append((p, str(e)))
            continue
        return p, skipped
    return None, skipped


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``output_dir`` that is complete and verifies, or None.

    Each newer one skipped is reported as a :class:`CheckpointWarning` saying why.
    """
    found, skipped = find_latest_checkpoint(output_dir)
    for path, why in skipped:
        warnings.warn(f"skipped {path.name}: {why}", CheckpointWarning, stacklevel=2)
    return found


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a sharded checkpoint (DCP's index in ``dcp/``); say nothing of its integrity."""
    return (Path(path) / SHARDED_INDEX).is_file()


def checkpoint_step(path: str | Path) -> int:
    """N of a ``checkpoint-N`` folder."""
    m = _CHECKPOINT_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint-N folder name")
    return int(m.group(1))


def rotate_checkpoints(
    output_dir: str | Path, keep: int, *, newest: Path | None = None, stale_steps: Collection[int] = ()
) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths.

    "Newest" is by position in the run, which is usually the step number, with two exceptions:

    - ``newest``, the checkpoint just written, is never deleted, even when others have higher
      steps (a run restarted in the same folder: its latest save is the one to keep);
    - ``stale_steps`` are ranked oldest, so they are deleted first. A run resumed from step S
      passes the steps > S of the run it replaces: those checkpoints are not on the new run's
      path (the trainer drops their metrics.jsonl records for the same reason), and keeping
      one would make ``--resume_from_checkpoint latest`` jump back onto the old run.

    Among the rest, lower steps are deleted first.
    """
    found = list_checkpoints(output_dir)
    stale = set(stale_steps)

    def age(p: Path) -> tuple[int, int]:  # sorts oldest first
        step = checkpoint_step(p)
        return (2 if p == newest else 0 if step in stale else 1, step)

    ranked = sorted(found, key=age)
    doomed = [p for p in ranked[: max(0, len(found) - keep)] if p != newest]
    for p in doomed:
        discard(p)
    return doomed


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint. Tensors are on ``map_location`` (CPU by default)."""

    path: Path
    step: int
    config: Config
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    sharded: bool = False  # written as shards (dcp/); model_state is the whole model, read by this process

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, bytes flipped on disk, a pickle with code in it
        # Only the first line of torch's message: its advice to retry with weights_only=False
        # would run whatever code the file holds.
        first_line = _first_line(e).split(" Please file an issue")[0].split(" Re-running `torch.load`")[0]
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint file ({first_line}); it holds something other than "
            "tensors and plain values (never load it with weights_only=False unless you trust its source): "
            "use an older checkpoint"
        ) from None


def check_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Raise :class:`CheckpointError` unless ``path`` is a complete checkpoint; return its manifest.

    ``verify`` also compares each file's SHA-256 with the manifest (reads every byte: about a
    second per GB); checkpoints written before format 2 have sizes only, which are checked.
    """
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        _restore_moved_aside(path.parent)
    if not path.exists():
        parent = path.parent
        found = list_checkpoints(parent)
        hint = f"; checkpoints in {parent}: {', '.join(p.name for p in found)}" if found else ""
        raise CheckpointError(f"{path}: no such checkpoint{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a folder like output_dir/checkpoint-N)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint, {MANIFEST_FILE} is missing (the save was interrupted, "
            "or this folder is not a minilm checkpoint)"
        )
    try:
        manifest = parse_json_object(manifest_path.read_bytes(), str(manifest_path), what="manifest")
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        entries = {}
        for name, entry in files.items():
            if isinstance(entry, dict):  # format 2: {"bytes": n, "sha256": hex}
                entries[name] = (entry["bytes"], entry["sha256"])
            else:  # format 1: the size alone
                entries[name] = (entry, None)
            if not isinstance(entries[name][0], int) or ".." in Path(name).parts or Path(name).is_absolute():
                raise TypeError(f"bad entry for {name!r}")
    except (ConfigError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(
            f"{manifest_path}: corrupt manifest ({e}); this checkpoint cannot be checked: use an older one"
        ) from None
    for name, (size, _) in entries.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (the checkpoint is incomplete): use an older one")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: corrupt checkpoint file, {f.stat().st_size} bytes on disk but {size} were written: "
                "use an older checkpoint"
            )
    for name, (_, sha) in entries.items():  # after the cheap checks: hashing reads every byte
        f = path / name
        if verify and sha is not None and file_sha256(f) != sha:
            raise CheckpointError(
                f"{f}: corrupt checkpoint file, its SHA-256 differs from the one recorded when it was saved "
                "(changed on disk or by a bad copy): use an older checkpoint, or copy this one again"
            )
    if not {MODEL_FILE, LEGACY_MODEL_FILE, SHARDED_INDEX} & set(entries):
        raise CheckpointError(
            f"{path}: the manifest lists no model weights ({MODEL_FILE} or {SHARDED_INDEX}): use an older checkpoint"
        )
    return manifest


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, training_state: bool = True, weights: bool = True
) -> Checkpoint:
    """Read and verify a checkpoint folder; raises :class:`CheckpointError` if it cannot be used.

    ``training_state=False`` skips ``training_state.pt`` (sampling needs only the weights, which
    are safetensors: then nothing is unpickled at all); ``training_state`` is then ``{}`` and
    ``step`` comes from the manifest. ``weights=False`` skips the weights (``model_state`` is
    ``{}``): for the config alone, or a sharded resume where every rank reads its own shards.

    A sharded checkpoint's shards are read whole into this process (its ``model_state``; with the
    training state, ``training_state["optimizer"]`` holds AdamW's whole state keyed by name).
    """
    path = Path(path)
    manifest = check_checkpoint(path)
    try:
        values = parse_json_object((path / CONFIG_FILE).read_bytes(), str(path / CONFIG_FILE), what="config")
        config = config_from_dict(values, source=str(path / CONFIG_FILE), check_estimate=False)
    except (ConfigError, OSError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: corrupt config ({e})") from None
    sharded = SHARDED_INDEX in manifest["files"]
    state: dict[str, Any] = {}
    if training_state:
        state = _torch_load(path / STATE_FILE, map_location)
    model_state: Any = {}
    if weights and sharded:
        from minilm.sharded_checkpoint import GROUPS_KEY, read_whole

        model_state, optimizer = read_whole(path, state.get(GROUPS_KEY) if isinstance(state, dict) else None)
        if optimizer is not None:
            state["optimizer"] = optimizer
    elif weights and (path / MODEL_FILE).is_file():
        model_state = load_weights(path / MODEL_FILE, map_location)
    elif weights:  # a checkpoint written before safetensors
        model_state = _torch_load(path / LEGACY_MODEL_FILE, map_location)
    bad_model = not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values())
    if bad_model or not isinstance(state, dict) or (training_state and "step" not in state):
        raise CheckpointError(f"{path}: its files do not hold a minilm checkpoint (no weights or no step)")
    step = state["step"] if training_state else manifest.get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"{path}: its step is not a number ({step!r})")
    return Checkpoint(
        path=path,
        step=int(step),
        config=config,
        model_state=clean_state_dict(model_state),
        training_state=state,
        sharded=sharded,
    )


@contextlib.contextmanager
def resume_errors(path: str | Path) -> Iterator[None]:
    """Turn what a checkpoint's contents can raise while a run resumes from it into one :class:`CheckpointError`.

    The files passed their checksums, so this is a file written by something other than minilm's
    trainer, or by a different version: a missing key (``training_state.pt`` without the optimizer),
    a tensor of the wrong shape, an RNG state of the wrong type.
    """
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(
            f"{Path(path) / STATE_FILE}: has no {e} entry, which a resume needs (not written by minilm's trainer?): "
            "use another checkpoint"
        ) from None
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: cannot resume from it ({_first_line(e)}): its training state does not fit this run; "
            "use another checkpoint"
        ) from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, config) from a checkpoint, the model in eval mode: for sampling and notebooks."""
    from minilm.model import GPT
    from minilm.tokenizer import load_tokenizer

    ckpt = load_checkpoint(path, map_location="cpu", training_state=False)
    model = GPT(ckpt.config)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit the checkpoint's config ({' '.join(first[:2])})") from None
    model.to(device).eval()
    if ckpt.tokenizer_dir is None:
        raise CheckpointError(f"{path}: has no {TOKENIZER_DIR}/ folder, so its token ids cannot be decoded")
    return model, load_tokenizer(ckpt.tokenizer_dir), ckpt.config


def check_resumable(ck: Checkpoint, cfg: Config, tokenizer_fingerprint: str) -> list[str]:
    """Raise :class:`CheckpointError` unless ``ck`` can continue under ``cfg``; return the fields that changed.

    The network's shape and token ids (:data:`minilm.config.SHAPE_FIELDS`) must agree, and so
    must the tokenizer built for the dataset; schedule and system fields may change.
    """
    mismatched = [f for f in SHAPE_FIELDS if getattr(ck.config, f) != getattr(cfg, f)]
    if mismatched:
        details = ", ".join(
            f"{f}: checkpoint {getattr(ck.config, f)!r} vs config {getattr(cfg, f)!r}" for f in mismatched
        )
        raise CheckpointError(f"{ck.path}: does not fit this config ({details})")
    if ck.training_state.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise CheckpointError(f"{ck.path}: its tokenizer differs from the one built for dataset '{cfg.dataset}'")
    return [f for f in cfg.to_dict() if getattr(ck.config, f) != getattr(cfg, f)]
