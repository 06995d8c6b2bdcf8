"""Faults: a kill at every step of a save and of a rotation, random kill -9s during training, and one
clear ``error:`` line (with the documented exit code) for every bad input minilm reads.

Children are forked from this process (torch is already imported: a fork costs milliseconds where a
fresh interpreter costs seconds), and killed with SIGKILL, which no handler can intercept.
"""

import faulthandler
import gzip
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import minilm.checkpoint as checkpoint_module
import minilm.trainer  # noqa: F401  (imported here, so that forked children start training at once)
from minilm import GPT, Config
from minilm.checkpoint import (
    check_checkpoint,
    clean_output_dir,
    file_sha256,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from minilm.cli import main
from minilm.runs import LOCK_FILE, RunLock, read_metrics
from minilm.tokenizer import CharTokenizer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault tests fork children (POSIX)"),
]

# Building an optimizer imports torch._dynamo (and sympy) on first use: seconds. Done once here, so
# that a forked child starts training at once and the random kills land in training and saving.
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)

CFG = Config(vocab_size=40, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, tokenizer="char")
TOKENIZER = CharTokenizer("\n !,.:;?abcdefghijklmnopqrstuvwxyzABCDE")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "fault-cache"))


def in_child(fn, kill_after: float | None = None, hang_after: float = 600.0) -> int:
    """Run ``fn()`` in a forked child and return its exit code (-9: killed).

    With ``kill_after``, SIGKILL the child after that many seconds unless it finished first. A child
    still running after ``hang_after`` seconds has hung: its stacks are printed, it is killed, and the
    test fails, rather than the whole suite waiting forever.
    """
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            # On a descriptor of its own: quiet_main sends fd 2 to /dev/null.
            faulthandler.dump_traceback_later(hang_after - 5, file=os.fdopen(os.dup(2), "w"))
            code = fn() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + (hang_after if kill_after is None else min(kill_after, hang_after))
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert kill_after is not None and kill_after <= hang_after, f"the child hung: running after {hang_after:.0f} s"
    return code


# ---------------------------------------------------------------------------------------
# A kill at every file-system step of saving and rotating
# ---------------------------------------------------------------------------------------
# Re-saving step 3 moves the old checkpoint-3 aside; each step's weights are seeded by SEEDS[i].
SAVES = [(1, 1), (2, 2), (3, 3), (3, 103)]  # (step, seed): limit 2, so saving step 3 rotates checkpoint-1 away
OPS = ("replace", "rename", "unlink", "rmdir")


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return GPT(CFG).state_dict()


def do_saves(out: Path, saves=SAVES, kill_at: int | None = None, counter: Path | None = None) -> None:
    """The save sequence; with ``kill_at`` = k the process SIGKILLs itself just before its k-th file operation.

    ``counter`` receives the number of operations after each finished save ("done ops"), so the
    parent knows which saves had finished when the kill came.
    """
    n = 0
    real = {name: getattr(os, name) for name in OPS}

    def wrap(name):
        def op(*args, **kwargs):
            nonlocal n
            n += 1
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](*args, **kwargs)

        return op

    for name in OPS:
        setattr(os, name, wrap(name))
    try:
        for i, (step, seed) in enumerate(saves):
            save_checkpoint(
                out,
                step,
                model_state=weights(seed),
                training_state={"seed": seed},
                config=CFG,
                tokenizer=TOKENIZER,
                save_total_limit=2,
            )
            if counter is not None:
                with open(counter, "w") as f:  # open/write: not one of the counted operations
                    f.write(f"{i + 1} {n}")
    finally:
        for name in OPS:
            setattr(os, name, real[name])


def test_a_kill_at_every_step_of_save_and_rotation_loses_no_good_checkpoint(tmp_path):
    """Kill before each rename/unlink/rmdir of four saves (a new step, two with rotation, a re-save of the
    same step): every checkpoint-N left verifies and holds one of the weights saved as step N, the newest
    one never falls behind the last finished save, start-up clean-up leaves no debris, and finishing the
    saves gives exactly the uninterrupted result."""
    ref = tmp_path / "ref"
    counter = tmp_path / "ops"
    assert in_child(lambda: do_saves(ref, counter=counter)) == 0
    total = int(counter.read_text().split()[1])
    assert total >= 20  # tokenizer renames, checkpoint renames, rotation's rename + unlinks, the re-save's
    expected = {step: [] for step, _ in SAVES}
    for step, seed in SAVES:
        expected[step].append(weights(seed))
    ref_names = sorted(os.listdir(ref))
    assert ref_names == ["checkpoint-2", "checkpoint-3"]

    for k in range(1, total + 1):
        out, progress = tmp_path / f"kill-{k}", tmp_path / f"progress-{k}"
        assert in_child(lambda out=out, k=k, progress=progress: do_saves(out, kill_at=k, counter=progress)) == (
            -signal.SIGKILL
        ), f"kill point {k} was not reached"
        finished = int(progress.read_text().split()[0]) if progress.exists() else 0
        # Every checkpoint-N folder that a listing leaves (a moved-aside one is put back) verifies.
        for p in list_checkpoints(out):
            check_checkpoint(p)
        names = [p for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)]
        assert all((p / "manifest.json").is_file() for p in names), f"kill {k}: a checkpoint folder without manifest"
        latest, skipped = find_latest_checkpoint(out)
        assert skipped == [], f"kill {k}: {skipped}"
        if finished:
            assert latest is not None and load_checkpoint(latest).step >= SAVES[finished - 1][0], f"kill {k}"
        if latest is not None:
            ck = load_checkpoint(latest)
            assert any(all(torch.equal(ck.model_state[n], w[n]) for n in w) for w in expected[ck.step]), (
                f"kill {k}: checkpoint-{ck.step} holds weights never saved as that step"
            )
        clean_output_dir(out)
        assert all(re.fullmatch(r"checkpoint-\d+", p.name) for p in out.iterdir()), sorted(os.listdir(out))
        # Finish: redo the saves that had not finished; the folder ends as the uninterrupted one.
        assert in_child(lambda out=out, finished=finished: do_saves(out, SAVES[finished:])) == 0
        assert sorted(os.listdir(out)) == ref_names
        for name in ref_names:
            assert file_sha256(out / name / "model.safetensors") == file_sha256(ref / name / "model.safetensors")


# ---------------------------------------------------------------------------------------
# Random kill -9 during training, then resume: the same final weights and metrics
# ---------------------------------------------------------------------------------------
def train_args(config: Path, out: Path) -> list[str]:
    return ["train", "--config", str(config), "--output_dir", str(out), "--no_progress"]


def quiet_main(argv: list[str]) -> int:
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    return main(argv)


def current_line(out: Path) -> list[tuple]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = read_metrics(out / "metrics.jsonl")
    return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def test_random_kills_during_training_then_resume_reach_the_uninterrupted_weights(tmp_path, micro_config):
    """At least 10 SIGKILLs at random moments (often inside a save: one every step), each followed by
    ``--resume_from_checkpoint latest``: no good checkpoint is lost, none damaged is picked, and the final
    weights and the metrics log equal an uninterrupted run's exactly."""
    cfg = micro_config(tmp_path / "unused", max_steps=30, warmup_steps=2, eval_steps=10, save_steps=1)
    config = tmp_path / "micro.json"
    cfg.replace(save_total_limit=2).save(config)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert in_child(lambda: quiet_main(train_args(config, ref))) == 0
    duration = time.monotonic() - t0
    reference = load_checkpoint(ref / "checkpoint-30")

    rng = random.Random(11)
    out = tmp_path / "run"
    kills, runs, last_step, in_save, last_killed = 0, 0, 0, 0, False
    while kills < 10 or not (out / "checkpoint-30").exists():
        latest, skipped = find_latest_checkpoint(out)
        assert skipped == [], skipped  # a kill never leaves a checkpoint-N that fails to verify
        step = load_checkpoint(latest).step if latest else 0
        assert step >= last_step, f"the newest checkpoint went back from {last_step} to {step}: one was lost"
        last_step = step
        if step == 30 and kills < 10:  # finished early: start the run over (this also tests the overwrite)
            argv, last_step = [*train_args(config, out), "--overwrite_output_dir"], 0
        elif latest is not None:
            argv = [*train_args(config, out), "--resume_from_checkpoint", "latest"]
        else:
            argv = [*train_args(config, out), "--overwrite_output_dir"]  # killed before the first save
        runs += 1
        assert runs < 60, "too many runs: the kills never let training advance"
        if kills < 10:
            code = in_child(lambda argv=argv: quiet_main(argv), rng.uniform(0.05, 0.6) * duration)
            assert code in (0, -signal.SIGKILL), f"run {runs} ({argv[-2:]}) exited {code}"
            kills += code == -signal.SIGKILL
            last_killed = code == -signal.SIGKILL
            if code == -signal.SIGKILL:  # where the kill landed: inside a save when its temporary folder is there
                in_save += any(p.name.startswith((".tmp-", ".old-", ".trash-")) for p in out.iterdir())
        else:
            assert in_child(lambda argv=argv: quiet_main(argv)) == 0
            last_killed = False
    final = load_checkpoint(out / "checkpoint-30")
    for name, value in reference.model_state.items():
        assert torch.equal(final.model_state[name], value), name
    assert current_line(out) == current_line(ref)  # the log is the current run's line, every step once
    if last_killed:  # the tenth kill landed after the last save: its lock stays behind, stale
        lock, notes = RunLock(out), []
        lock.acquire(log=notes.append)  # the next run takes it over (a live holder would raise RunError)
        lock.release()
    assert not (out / LOCK_FILE).exists()
    print(f"{kills} kills in {runs} runs, {in_save} of them inside a save; reference run {duration:.2f} s")


def test_a_run_without_a_progress_bar_never_takes_tqdms_lock(tmp_path, micro_config, monkeypatch):
    """tqdm's lock is a semaphore shared with forked processes: a child killed while holding it blocks
    every later process that writes through tqdm, forever (this hung the kill test above in CI). With
    progress off, a run never takes it, not even for a disabled bar or a log line."""
    import threading

    from tqdm import std
    from tqdm._monitor import TMonitor

    take = std.TqdmDefaultWriteLock.acquire

    def refuse(self, *args, **kwargs):
        if isinstance(threading.current_thread(), TMonitor):
            # tqdm's own monitor thread, left running by an earlier test's bar, polls its bars
            return take(self, *args, **kwargs)
        raise AssertionError("tqdm's lock was taken")

    monkeypatch.setattr(std.TqdmDefaultWriteLock, "acquire", refuse)
    cfg = micro_config(tmp_path / "out", max_steps=3, warmup_steps=1, eval_steps=2, save_steps=2)
    config = tmp_path / "micro.json"
    cfg.save(config)
    assert main(train_args(config, tmp_path / "out")) == 0


# ---------------------------------------------------------------------------------------
# Bad inputs: one error line each, with the documented exit code
# ---------------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, expected_code: int, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert lines and "error: " in lines[-1], err
    assert sum("error:" in line for line in lines) == 1, err
    assert re.search(pattern, lines[-1]), lines[-1]


@pytest.fixture
def micro_json(tmp_path, micro_config):
    cfg = micro_config(tmp_path / "out", max_steps=4, warmup_steps=1, eval_steps=2, save_steps=2)
    path = tmp_path / "micro.json"
    cfg.save(path)
    return path, cfg


@pytest.fixture
def trained(micro_json, capsys):
    path, cfg = micro_json
    assert main(["train", "--config", str(path), "--no_progress"]) == 0
    capsys.readouterr()
    return path, cfg, Path(cfg.output_dir)


def rewrite_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a changed file: the content, not the checksum, is what is tested."""
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": file_sha256(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(m))


CONFIG_CASES = {
    "latin-1": ("description: caf\xe9".encode("latin-1"), "not UTF-8 text"),
    "duplicate-key": (b'{"d_model": 32, "d_model": 64}', "key 'd_model' appears twice"),
    "empty": (b"", "malformed JSON"),
    "array": (b"[1]", "expected a JSON object"),
    "nan": (b'{"learning_rate": NaN}', "field 'learning_rate' must be finite"),
    "deep": (b"[" * 100000, "malformed JSON"),
    "huge-number": (b'{"seed": ' + b"9" * 5000 + b"}", "a number in the file is too long to read"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_file_is_one_error_line_exit_2(case, tmp_path, capsys):
    content, expected = CONFIG_CASES[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content if case != "latin-1" else b'{"description": "caf\xe9"}')
    code, err = run_cli(["train", "--config", str(path), "--dry_run"], capsys)
    assert_one_error(code, err, 2, rf"{re.escape(str(path))}: .*{expected}")


def test_config_with_a_byte_order_mark_is_accepted(micro_json, tmp_path, capsys):
    path, cfg = micro_json
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, _ = run_cli(["train", "--config", str(bom), "--dry_run"], capsys)
    assert code == 0


def test_unreadable_config_file_is_one_error_line(micro_json, capsys, monkeypatch):
    path, _ = micro_json
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs CI here
    code, err = run_cli(["train", "--config", str(path), "--dry_run"], capsys)
    assert_one_error(code, err, 2, "cannot read the config file \\(Permission denied\\)")


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--d_model", "1000000000", "--n_heads", "1"], r"the model would have [\d,.e+]+ parameters"),
        (["--n_layers", "100000000"], r"the model would have [\d,.e+]+ parameters"),
        (["--vocab_size", "1000000000000"], r"the model would have [\d,.e+]+ parameters"),
    ],
    ids=["d_model", "n_layers", "vocab_size"],
)
def test_absurd_sizes_fail_validation_with_the_parameter_count(micro_json, capsys, flags, pattern):
    code, err = run_cli(["train", "--config", str(micro_json[0]), *flags, "--dry_run"], capsys)
    assert_one_error(code, err, 2, pattern)


def test_a_step_that_does_not_fit_in_memory_stops_before_allocating(micro_json, capsys, monkeypatch):
    """`--batch_size 100000` on a CPU: the kernel used to kill the process at 21 GB with nothing printed."""
    import minilm.runs

    monkeypatch.setattr(minilm.runs, "free_host_memory", lambda: 2 * 1024**3)
    path, cfg = micro_json
    code, err = run_cli(["train", "--config", str(path), "--batch_size", "100000", "--no_progress"], capsys)
    assert_one_error(
        code, err, 1, r"needs about [\d.]+ GiB .* but only 2\.00 GiB of host RAM .*--batch_size \d+ --grad_acc"
    )
    assert "--skip_memory_check" in err
    assert not Path(cfg.output_dir).exists() or not list(Path(cfg.output_dir).iterdir())  # nothing written


def test_the_memory_check_counts_the_loss_the_trainer_runs(micro_config, tmp_path):
    """The trainer computes its loss in chunks, so the check must not count the full (b, s, V) logits:
    free memory between the two estimates is enough, and a byte less than the chunked one is not."""
    from minilm.memory import estimate_training_memory
    from minilm.runs import RunError, check_memory

    cfg = micro_config(tmp_path, vocab_size=4096, batch_size=64)  # logits large beside a micro model
    eval_bytes = cfg.eval_batches * cfg.batch_size * cfg.max_seq_len * 2 * 8
    chunked = estimate_training_memory(cfg, device_type="cpu", chunked_loss=True).peak_bytes + eval_bytes
    full = estimate_training_memory(cfg, device_type="cpu").peak_bytes + eval_bytes
    assert full > 2 * chunked
    check_memory(cfg, torch.device("cpu"), free_bytes=(chunked + full) // 2)
    check_memory(cfg, torch.device("cpu"), free_bytes=chunked)
    with pytest.raises(RunError, match="needs about"):
        check_memory(cfg, torch.device("cpu"), free_bytes=chunked - 1)


def test_too_many_validation_batches_stop_before_allocating(micro_json, capsys, monkeypatch):
    """`--eval_batches 100000000` would hold 100 GB of fixed validation batches: refused with both numbers."""
    import minilm.runs

    monkeypatch.setattr(minilm.runs, "free_host_memory", lambda: 2 * 1024**3)
    path, cfg = micro_json
    code, err = run_cli(["train", "--config", str(path), "--eval_batches", "100000000", "--no_progress"], capsys)
    assert_one_error(code, err, 1, r"100,000,000 validation batches \(eval_batches\) need [\d.]+ GiB .* only 2\.00 GiB")


def test_skip_memory_check_starts_anyway(micro_json, capsys, monkeypatch):
    import minilm.runs

    monkeypatch.setattr(minilm.runs, "free_host_memory", lambda: 1)  # nothing fits in one byte
    path, _ = micro_json
    code, err = run_cli(["train", "--config", str(path), "--no_progress", "--max_steps", "1"], capsys)
    assert code == 1 and "Pass --skip_memory_check" in err
    code, err = run_cli(
        ["train", "--config", str(path), "--no_progress", "--max_steps", "1", "--skip_memory_check"], capsys
    )
    assert code == 0, err


def test_fresh_run_in_a_folder_with_another_run_is_refused_then_overwritten(trained, capsys):
    path, cfg, out = trained
    before = sorted(os.listdir(out))
    code, err = run_cli(["train", "--config", str(path), "--no_progress"], capsys)
    assert_one_error(code, err, 1, r"holds another run \(checkpoint-2, checkpoint-4, metrics.jsonl\)")
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    assert sorted(os.listdir(out)) == before  # nothing touched
    code, err = run_cli(["train", "--config", str(path), "--no_progress", "--overwrite_output_dir"], capsys)
    assert code == 0, err
    (moved,) = (out / "replaced").iterdir()
    assert sorted(os.listdir(moved)) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]  # kept, not deleted
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_second_run_in_the_same_folder_names_the_process_that_holds_it(trained, capsys):
    path, cfg, out = trained
    holder = os.fork()
    if holder == 0:  # a live process that "trains" there
        time.sleep(60)
        os._exit(0)
    try:
        info = {"pid": holder, "host": os.uname().nodename, "start": None, "since": "2026-01-01 00:00:00 UTC"}
        (out / LOCK_FILE).write_text(json.dumps(info))
        code, err = run_cli(
            ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest"], capsys
        )
        assert_one_error(code, err, 1, rf"another run is using this output_dir: process {holder} on this machine")
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    # The holder is gone: its lock is stale and taken over.
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest", "--max_steps", "5"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["garbage", "folder"])
def test_an_unreadable_old_lock_is_taken_over(trained, capsys, kind):
    path, cfg, out = trained
    lock = out / LOCK_FILE
    if kind == "folder":
        lock.mkdir()
        (lock / "x").write_text("x")
    else:
        lock.write_text("garbage")
    os.utime(lock, (0, 0))  # old: not a lock being written right now
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest", "--max_steps", "5"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_damaged_metrics_lines_are_skipped_and_never_block_a_resume(trained, capsys):
    path, cfg, out = trained
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 5, "lo')  # a kill in the middle of a write
    with pytest.warns(Warning, match=r"skipped 1 damaged line"):
        assert len(read_metrics(out / "metrics.jsonl")) == 6  # 4 train + 2 eval records
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest", "--max_steps", "6"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    (moved,) = (out / "replaced").iterdir()
    assert (moved / "metrics.jsonl").read_text() == '{"kind": "train", "step": 5, "lo\n'  # kept, not lost


def test_resuming_an_older_step_keeps_the_replaced_runs_records_and_checkpoints(trained, capsys):
    """Resume from checkpoint-2 of a 4-step run, and crash before the next save: `latest` must be this
    run's checkpoint-2, not the replaced run's checkpoint-4, and no record is lost."""
    path, cfg, out = trained
    full = read_metrics(out / "metrics.jsonl")
    argv = ["train", "--no_progress", "--resume_from_checkpoint", str(out / "checkpoint-2"), "--max_steps", "4"]
    real_save = checkpoint_module.save_checkpoint

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill before the first save of the resumed run

    checkpoint_module.save_checkpoint = crash
    try:
        code = in_child(lambda: quiet_main(argv))
    finally:
        checkpoint_module.save_checkpoint = real_save
    assert code != 0
    assert find_latest_checkpoint(out)[0] == out / "checkpoint-2"
    (moved,) = (out / "replaced").iterdir()
    assert (moved / "checkpoint-4").is_dir()
    kept = read_metrics(out / "metrics.jsonl")
    replaced = read_metrics(moved / "metrics.jsonl")
    assert [r for r in kept if r["step"] <= 2] == [r for r in full if r["step"] <= 2]
    assert replaced == [r for r in full if r["step"] > 2]


def test_training_state_without_the_optimizer_is_one_error_line(trained, capsys):
    path, cfg, out = trained
    ck = out / "checkpoint-4"
    state = torch.load(ck / "training_state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ck / "training_state.pt")
    rewrite_manifest(ck, "training_state.pt")
    code, err = run_cli(["train", "--no_progress", "--resume_from_checkpoint", str(ck)], capsys)
    assert_one_error(code, err, 1, r"training_state.pt: has no 'optimizer' entry")


@pytest.mark.parametrize("name", ["config.json", "manifest.json"])
def test_random_bytes_in_a_checkpoint_json_are_one_error_line(trained, capsys, name):
    path, cfg, out = trained
    ck = out / "checkpoint-4"
    (ck / name).write_bytes(os.urandom(300))
    if name == "config.json":
        rewrite_manifest(ck, name)
    code, err = run_cli(["train", "--no_progress", "--resume_from_checkpoint", str(ck)], capsys)
    assert_one_error(code, err, 1, rf"{name}: corrupt (config|manifest)")
    code, err = run_cli(["sample", "--checkpoint", str(ck)], capsys)
    assert_one_error(code, err, 1, rf"{name}: corrupt (config|manifest)")


def test_flipped_bytes_in_the_weights_are_caught_and_latest_takes_the_previous_checkpoint(trained, capsys):
    """The issue's first finding: 64 flipped bytes in the weights loaded silently; resume trained on them."""
    path, cfg, out = trained
    f = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])
    f.write_bytes(bytes(data))
    code, err = run_cli(["sample", "--checkpoint", str(out / "checkpoint-4")], capsys)
    assert_one_error(code, err, 1, r"model.safetensors: corrupt checkpoint file, its SHA-256 differs")
    code, err = run_cli(["sample", "--checkpoint", str(out), "--max_new_tokens", "5"], capsys)
    assert code == 0 and "skipped checkpoint-4" in err, err
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest"]
    code, err = run_cli(argv, capsys)
    assert code == 0 and "latest skipped checkpoint-4: " in err and "SHA-256" in err, err
    assert (out / "checkpoint-4").is_dir() and load_checkpoint(out / "checkpoint-4").step == 4  # re-trained


def test_only_damaged_checkpoints_is_one_error_line(trained, capsys):
    path, cfg, out = trained
    for ck in list_checkpoints(out):
        (ck / "model.safetensors").write_bytes(b"\0" * (ck / "model.safetensors").stat().st_size)
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest"]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, 1, r"latest: no usable checkpoint in")
    code, err = run_cli(["sample", "--checkpoint", str(out)], capsys)
    assert_one_error(code, err, 1, r"no usable checkpoint in this folder \(every one is damaged")


def test_a_full_disk_during_a_save_is_one_error_line(micro_json, capsys, monkeypatch):
    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint_module, "_torch_save", full)
    code, err = run_cli(["train", "--config", str(micro_json[0]), "--no_progress"], capsys)
    assert_one_error(code, err, 1, r"checkpoint-2: could not write the checkpoint .*full disk")


@pytest.mark.parametrize("content", [b"garbage{", b"", b'{"dtype": "float64", "tokens": {"train": 1, "val": 1}}'])
def test_damaged_data_cache_meta_is_rebuilt(micro_json, capsys, tmp_path, content):
    path, cfg = micro_json
    cache = tmp_path / "cache"
    argv = ["train", "--config", str(path), "--no_progress", "--max_steps", "2", "--cache_dir", str(cache)]
    assert run_cli([*argv, "--output_dir", str(tmp_path / "a")], capsys)[0] == 0
    (meta,) = cache.glob("tokens-*/meta.json")
    good = meta.read_bytes()
    meta.write_bytes(content)
    code, err = run_cli([*argv, "--output_dir", str(tmp_path / "b")], capsys)
    assert code == 0 and "damaged token cache" in err and "rebuilding it" in err, err
    assert meta.read_bytes() == good


@pytest.mark.parametrize("kind", ["bad-gzip", "latin-1", "missing", "empty-name"])
def test_bad_dataset_is_one_error_line(micro_json, capsys, tmp_path, kind):
    path, _ = micro_json
    data = tmp_path / ("corpus.txt.gz" if kind == "bad-gzip" else "corpus.txt")
    if kind == "bad-gzip":
        data.write_bytes(gzip.compress(b"hello world " * 1000)[:50])  # cut short
    elif kind == "latin-1":
        data.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    elif kind == "empty-name":
        data = ""
    expected = {
        "bad-gzip": "not a valid .gz file",
        "latin-1": "not UTF-8 text",
        "missing": "no such file or folder",
        "empty-name": "dataset is empty",
    }
    code, err = run_cli(["train", "--config", str(path), "--no_progress", "--dataset", str(data)], capsys)
    assert_one_error(code, err, 1, expected[kind])


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--temperature", "-1"], "must be >= 0"),
        (["--max_new_tokens", "x"], "invalid int value"),
        (["--seed", "-5"], "--seed must be from 0"),
        (["--num_samples", "0"], "--num_samples >= 1"),
    ],
    ids=["nan", "inf", "negative", "not-int", "seed", "samples"],
)
def test_bad_sample_arguments_are_one_error_line_exit_2(trained, capsys, flags, pattern):
    code, err = run_cli(["sample", "--checkpoint", str(trained[2]), *flags], capsys)
    assert_one_error(code, err, 2, pattern)


def test_top_k_beyond_the_vocabulary_means_all_of_it(trained, capsys):
    code, err = run_cli(
        ["sample", "--checkpoint", str(trained[2]), "--top_k", "100000", "--max_new_tokens", "5"], capsys
    )
    assert code == 0, err


def test_damaged_tokenizer_in_a_checkpoint_is_one_error_line(trained, capsys):
    path, cfg, out = trained
    ck = out / "checkpoint-4"
    name = "tokenizer/minilm_tokenizer.json"
    (ck / name).write_text('{"kind": "char", "vocab_size": 3, "chars": "ab"}')
    rewrite_manifest(ck, name)
    code, err = run_cli(["sample", "--checkpoint", str(ck)], capsys)
    assert_one_error(code, err, 1, r"tokenizer: saved vocab_size 3 != loaded 2")


def test_leftovers_of_interrupted_saves_are_cleaned_at_start_with_a_notice(trained, capsys):
    path, cfg, out = trained
    (out / ".tmp-checkpoint-6-abc").mkdir()
    shutil.copytree(out / "checkpoint-2", out / ".trash-checkpoint-2-1-ff")
    argv = ["train", "--config", str(path), "--no_progress", "--resume_from_checkpoint", "latest", "--max_steps", "5"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: removed 2 leftover(s) of interrupted saves or deletes" in printed
    assert not any(p.name.startswith(".") and p.name != LOCK_FILE for p in out.iterdir())


def test_a_checkpoint_written_before_safetensors_still_resumes_exactly(trained, capsys):
    """Format 1 (model.pt, a manifest of sizes): resuming from it reaches the same step-4 weights."""
    path, cfg, out = trained
    original = load_checkpoint(out / "checkpoint-4").model_state
    ck = out / "checkpoint-2"
    torch.save(load_checkpoint(ck).model_state, ck / "model.pt")
    (ck / "model.safetensors").unlink()
    files = {str(p.relative_to(ck)): p.stat().st_size for p in sorted(ck.rglob("*")) if p.is_file()}
    files.pop("manifest.json")
    (ck / "manifest.json").write_text(json.dumps({"format_version": 1, "step": 2, "files": files}))
    code, err = run_cli(["train", "--no_progress", "--resume_from_checkpoint", str(ck)], capsys)
    assert code == 0, err
    resumed = load_checkpoint(out / "checkpoint-4")
    assert (resumed.path / "model.safetensors").is_file()  # saved in the new format from then on
    for name, value in original.items():
        assert torch.equal(resumed.model_state[name], value), name
