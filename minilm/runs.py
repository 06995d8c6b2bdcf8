"""One run per output_dir: the folder check, the lock, the metrics log, and the memory check.

What a training run needs settled before it allocates anything or writes a file:

- **One run per folder.** A fresh run (no ``--resume_from_checkpoint``) in an ``output_dir`` that
  already holds checkpoints or metrics is refused: resume it, or pass ``--overwrite_output_dir``
  (the Hugging Face Trainer's name), which moves the old run's files into ``replaced/``.
- **A lock.** ``output_dir/.minilm.lock`` holds the pid, host and start time of the process
  that trains there; a second process is refused with a message naming the first. A lock
  whose process is gone (same host, pid no longer running) is stale and taken over.
- **The metrics log keeps every record.** ``metrics.jsonl`` gets one JSON line per event. A
  resume from step S moves the records after S, and the checkpoints after S, of the run it
  replaces into ``replaced/<time>-after-step-S/``, so ``metrics.jsonl`` is the current run's line
  and nothing is deleted. Damaged lines (a kill mid-write) are skipped with a warning.
- **Memory.** :func:`check_memory` compares :func:`minilm.memory.trainer_step_memory` with
  the free host RAM (CPU) or device memory (CUDA) and stops with both numbers and the
  planner's cheapest fix when a step will not fit; ``--skip_memory_check`` overrides.

    >>> from minilm.runs import read_metrics
    >>> records = read_metrics("outputs/tiny/metrics.jsonl")
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minilm import checkpoint as ckpt_io
from minilm.config import Config
from minilm.files import write_atomic

LOCK_FILE = ".minilm.lock"
METRICS_FILE = "metrics.jsonl"
REPLACED_DIR = "replaced"  # records and checkpoints of runs that a resume or an overwrite replaced
_STALE_EMPTY_LOCK_S = 5.0  # a lock file still empty after this long belongs to a process killed while writing it

Log = Callable[[str], None]


class RunError(RuntimeError):
    """An output_dir that another run holds or uses, or a step that will not fit in memory."""


class MetricsWarning(UserWarning):
    """A damaged line in metrics.jsonl, skipped."""


# ---------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    except OSError:
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """``output_dir/.minilm.lock``: held by one process at a time; re-entrant within a process."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self, log: Log = print) -> None:
        """Take the lock, or raise :class:`RunError` naming the process that holds it."""
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self._mine()) + "\n")
                self.held = True
                atexit.register(self.release)
                return
            info = self._read()
            if info is None:  # empty or garbage: being written right now, or its writer was killed
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < _STALE_EMPTY_LOCK_S:
                    time.sleep(0.1)
                    continue
                log(f"note: removed an unreadable lock file {self.path} (its writer was interrupted)")
                self._take_over()
                continue
            same_host = info.get("host") == socket.gethostname()
            if same_host and info["pid"] == os.getpid():
                self.held = True  # a notebook kernel that trains in the same folder again
                atexit.register(self.release)
                return
            if same_host and not _alive(info["pid"], info.get("start")):
                log(f"note: removed a stale lock: process {info['pid']} that trained in {self.path.parent} is gone")
                self._take_over()
                continue
            where = f"on this machine ({info.get('host')})" if same_host else f"on host {info.get('host')!r}"
            raise RunError(
                f"{self.path.parent}: another run is using this output_dir: process {info['pid']} {where}, "
                f"since {info.get('since', '?')}. Wait for it to finish or stop it, or choose another --output_dir; "
                f"if that process is really gone, delete {self.path}"
            )
        raise RunError(f"{self.path}: could not take the run lock (it keeps changing); try again")

    def _take_over(self) -> None:
        # Rename, not unlink: of two processes taking over the same stale lock, only one rename succeeds.
        stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        if stale.is_dir():  # not a lock file at all: something else made a folder of that name
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock up (only if this process holds it)."""
        if not self.held:
            return
        self.held = False
        info = self._read()
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------
def holds_a_run(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` belongs to a run: ``checkpoint-N`` folders and a non-empty metrics.jsonl."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = sorted(p.name for p in output_dir.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))
    metrics = output_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    return found


def _replaced_folder(output_dir: Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = output_dir / REPLACED_DIR / f"{stamp}-{label}"
    n = 1
    while folder.exists():
        n += 1
        folder = output_dir / REPLACED_DIR / f"{stamp}-{label}-{n}"
    folder.mkdir(parents=True)
    return folder


def check_fresh_output_dir(output_dir: str | Path, *, overwrite: bool, log: Log = print) -> None:
    """Refuse a fresh run where another run's checkpoints or metrics are, unless ``overwrite``.

    With ``overwrite`` the old run's checkpoints and metrics.jsonl move to
    ``output_dir/replaced/<time>-overwritten/`` (one rename each): nothing is deleted.
    """
    output_dir = Path(output_dir)
    found = holds_a_run(output_dir)
    if not found:
        return
    if not overwrite:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunError(
            f"{output_dir}: holds another run ({listed}). Continue it with --resume_from_checkpoint latest, "
            "start over with --overwrite_output_dir (its files move to "
            f"{output_dir / REPLACED_DIR}/), or choose another --output_dir "
            "(in Python: Trainer(cfg, resume_from_checkpoint=...) or Trainer(cfg, overwrite_output_dir=True))"
        )
    folder = _replaced_folder(output_dir, "overwritten")
    for name in found:
        os.replace(output_dir / name, folder / name)
    log(f"note: --overwrite_output_dir: moved the previous run's {', '.join(found)} to {folder}")


# ---------------------------------------------------------------------------------------
# The metrics log
# ---------------------------------------------------------------------------------------
def _parse_record(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool):
        return None
    return rec


def read_metrics(path: str | Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; damaged lines are skipped with a :class:`MetricsWarning`.

    A missing file reads as no records. A line is damaged when it is not a JSON object with an
    integer ``step`` (a kill mid-write cuts the last line short; an editor may mangle any).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    records, damaged = [], []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        rec = _parse_record(line)
        if rec is None:
            damaged.append(number)
        else:
            records.append(rec)
    if damaged and warn:
        lines = ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else "")
        warnings.warn(
            f"{path}: skipped {len(damaged)} damaged line(s) ({lines}); the other records are intact",
            MetricsWarning,
            stacklevel=2,
        )
    return records


def append_record(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one record as a JSON line; starts a new line if a kill left the last one unfinished."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")  # the cut line stays damaged (and is skipped), this record stays whole
        f.write((json.dumps(rec) + "\n").encode("utf-8"))


def rewind(output_dir: str | Path, step: int, *, write: bool = True, log: Log = print) -> list[dict[str, Any]]:
    """Make ``output_dir`` the run resumed at ``step``; returns metrics.jsonl's records up to ``step``.

    The records after ``step`` (and damaged lines), and the checkpoints after ``step``, belong to
    the run being replaced. With ``write`` (rank 0) they move to
    ``output_dir/replaced/<time>-after-step-<step>/``: first a copy of the records (written to a
    temporary name, then renamed), then each checkpoint by one rename, and only then is
    metrics.jsonl rewritten (atomically). A kill at any point loses no record, and
    ``--resume_from_checkpoint latest`` can no longer jump back onto the replaced run.
    """
    output_dir = Path(output_dir)
    path = output_dir / METRICS_FILE
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    kept, kept_lines, moved_lines = [], [], []
    for line in lines:
        if not line.strip():
            continue
        rec = _parse_record(line)
        if rec is not None and rec["step"] <= step:
            kept.append(rec)
            kept_lines.append(line)
        else:
            moved_lines.append(line)
    if not write:  # other ranks: read only (rank 0 moves the files)
        return kept
    later = [
        p
        for p in (output_dir.iterdir() if output_dir.is_dir() else [])
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) and int(p.name[11:]) > step
    ]
    if not (moved_lines or later):
        return kept
    folder = _replaced_folder(output_dir, f"after-step-{step}")
    if moved_lines:
        write_atomic(folder / METRICS_FILE, "".join(line + "\n" for line in moved_lines))
    for p in sorted(later, key=lambda q: int(q.name[11:]), reverse=True):
        os.replace(p, folder / p.name)
    write_atomic(path, "".join(line + "\n" for line in kept_lines))
    what = [f"{len(moved_lines)} metrics record(s) after step {step}"] if moved_lines else []
    what += [", ".join(p.name for p in later)] if later else []
    log(f"note: resuming at step {step} replaces a later run: moved its {' and '.join(what)} to {folder}")
    return kept


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------
def free_host_memory() -> int | None:
    """Bytes of host RAM a new allocation can get: MemAvailable, capped by a cgroup (container) limit.

    None where it cannot be read (not Linux): then the check is skipped.
    """
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
    except (OSError, AttributeError, ValueError):
        return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            free = min(free, max(0, int(limit) - int(usage)))
        break
    return free


def _flags(before: Config, after: Config) -> str:
    changed = [f for f in before.to_dict() if getattr(before, f) != getattr(after, f)]
    values = {f: getattr(after, f) for f in changed}
    return " ".join(f"--{f} {str(v).lower() if isinstance(v, bool) else v}" for f, v in values.items())


def check_memory(cfg: Config, device: torch.device, *, free_bytes: int | None = None) -> None:
    """Raise :class:`RunError` when one training step's estimated peak exceeds the free memory.

    CPU: free host RAM (shared by the processes of a ``torchrun`` on this machine, so the
    estimate is multiplied by ``LOCAL_WORLD_SIZE``); CUDA: the device's free memory. The
    message gives both numbers in GiB and the cheapest fix of :func:`minilm.sizing.plan_to_fit`.
    ``free_bytes`` overrides the measurement (tests).
    """
    from minilm.compile_policy import compile_decision
    from minilm.flops import flops_per_token
    from minilm.memory import GB, trainer_step_memory
    from minilm.sizing import Hardware, plan_to_fit

    if device.type == "cuda":
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        where, per_process = f"free on {device} ({torch.cuda.get_device_name(device)})", 1
    elif device.type == "cpu":
        free_bytes = free_host_memory() if free_bytes is None else free_bytes
        per_process = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        where = "of host RAM available"
    else:
        return  # no way to ask how much is free
    # The fixed validation batches stay in host RAM all run: x and y, int64, for every eval batch.
    eval_bytes = cfg.eval_batches * cfg.batch_size * cfg.max_seq_len * 2 * 8
    host_free = free_bytes if device.type == "cpu" else free_host_memory()
    if host_free is not None and eval_bytes * per_process > host_free:
        raise RunError(
            f"the {cfg.eval_batches:,} validation batches (eval_batches) need {eval_bytes / GB:.2f} GiB of host RAM "
            f"but only {host_free / GB:.2f} GiB is available: lower --eval_batches (20 is typical). "
            "Pass --skip_memory_check to try anyway"
        )
    if free_bytes is None:
        return
    compiled, _ = compile_decision(cfg, device, flops_per_token(cfg))  # as the trainer will decide
    need = trainer_step_memory(cfg, device_type=device.type, compiled=compiled).peak_bytes * per_process
    if device.type == "cpu":
        need += eval_bytes * per_process
    if need <= free_bytes:
        return
    each = f" ({per_process} processes on this machine)" if per_process > 1 else ""
    plan = plan_to_fit(cfg, Hardware(memory_gb=free_bytes / per_process / GB, context_gb=0.0, headroom=0.10))
    if plan.best is not None and not plan.best.changes_model:
        fix = f"the planner's cheapest fix: {plan.best.describe()}, i.e. {_flags(cfg, plan.best.config)}"
    elif plan.best is not None:
        fix = f"nothing but a smaller model fits: {plan.best.describe()} ({_flags(cfg, plan.best.config)})"
    else:
        fix = "nothing the planner tried fits: use a smaller model or a machine with more memory"
    raise RunError(
        f"one training step needs about {need / GB:.2f} GiB{each} (minilm.memory estimate) but only "
        f"{free_bytes / GB:.2f} GiB {where}: {fix}. Pass --skip_memory_check to try anyway"
    )


# ---------------------------------------------------------------------------------------
# Everything a run settles before it starts
# ---------------------------------------------------------------------------------------
def start_run(
    cfg: Config,
    device: torch.device,
    *,
    resuming: bool,
    is_main: bool = True,
    overwrite_output_dir: bool = False,
    skip_memory_check: bool = False,
    log: Log = print,
) -> RunLock | None:
    """Memory check, then (rank 0) the lock, clean-up of interrupted saves and the one-run-per-folder check.

    Returns the lock (rank 0) for the trainer to release when it closes; raises :class:`RunError`.
    """
    if not skip_memory_check:
        check_memory(cfg, device)
    if not is_main:
        return None
    lock = RunLock(cfg.output_dir)
    try:
        lock.acquire(log)
    except PermissionError as e:
        raise OSError(e.errno, e.strerror, str(Path(cfg.output_dir) / LOCK_FILE)) from None
    for notice in ckpt_io.clean_output_dir(cfg.output_dir):
        log(f"note: {notice}")
    if not resuming:
        try:
            check_fresh_output_dir(cfg.output_dir, overwrite=overwrite_output_dir, log=log)
        except BaseException:
            lock.release()
            raise
    return lock
