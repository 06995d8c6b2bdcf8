"""Checkpoints: round trip, safetensors weights, checksums, atomic writes and rotation under SIGKILL,
clear errors, keep-last-K, no _orig_mod. keys."""

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minilm.checkpoint as checkpoint_module
from minilm import GPT, Config
from minilm.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    check_checkpoint,
    clean_output_dir,
    clean_state_dict,
    file_sha256,
    find_latest_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from minilm.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CFG = Config(vocab_size=40, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, tokenizer="char")
TOKENIZER = CharTokenizer("\n !,.:;?abcdefghijklmnopqrstuvwxyzABCDE")


def save(out: Path, step: int, model: torch.nn.Module | None = None, limit: int = 0) -> Path:
    model = GPT(CFG) if model is None else model
    return save_checkpoint(
        out,
        step,
        model_state=model.state_dict(),
        training_state={"rng": rng_state(), "sampler": {"step": step}, "note": "hello"},
        config=CFG,
        tokenizer=TOKENIZER,
        save_total_limit=limit,
    )


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    path = save(tmp_path, 7, model)
    assert path == tmp_path / "checkpoint-7"
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.config == CFG and ck.training_state["note"] == "hello"
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model_state[k], v), k
    loaded, tok, cfg = load_model(path)
    assert cfg == CFG and tok.decode(tok.encode("to be")) == "to be"
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip


def test_rng_states_restore_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: NPY002
    path = save(tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # noqa: NPY002
    set_rng_state(load_checkpoint(path).training_state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_compiled_and_ddp_prefixes_never_saved(tmp_path):
    model = GPT(CFG)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = save(tmp_path, 1, compiled)
    keys = load_checkpoint(path).model_state.keys()
    assert set(keys) == set(model.state_dict())
    assert clean_state_dict({"module._orig_mod.wte.weight": 1}) == {"wte.weight": 1}


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-40", "checkpoint-50"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-50"
    # Sorted by step number, not by name: 100 is newer than 50.
    save(tmp_path, 100, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-50", "checkpoint-100"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    save(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"checkpoint-5: no such checkpoint; checkpoints in .*checkpoint-4"):
        load_checkpoint(tmp_path / "checkpoint-5")
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "file.pt")
    (tmp_path / "manifest.json").unlink(missing_ok=True)
    half = tmp_path / "checkpoint-9"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="checkpoint-9: incomplete checkpoint, manifest.json is missing"):
        load_checkpoint(half)
    with pytest.warns(CheckpointWarning, match="skipped checkpoint-9: .*incomplete checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # the incomplete one is skipped


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save(tmp_path, 3)
    model_file = path / "model.safetensors"
    data = model_file.read_bytes()

    model_file.write_bytes(data[: len(data) // 2])  # truncated, e.g. a full disk
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: corrupt checkpoint file, \d+ bytes on disk but \d+"
    ):
        load_checkpoint(path)

    model_file.write_bytes(b"\0" * len(data))  # same size, wrong bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt checkpoint file, its SHA-256 differs"):
        load_checkpoint(path)

    (path / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match="training_state.pt is missing"):
        check_checkpoint(path)


def rewrite_manifest_entry(path: Path, name: str) -> None:
    """Record ``name``'s current size and hash, as a forger who also edits the manifest would."""
    manifest = json.loads((path / "manifest.json").read_text())
    f = path / name
    manifest["files"][name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name", ["model.safetensors", "training_state.pt", "config.json", "tokenizer/minilm_tokenizer.json"]
)
def test_flipped_bytes_in_any_file_are_caught_and_latest_skips_the_checkpoint(tmp_path, name):
    """64 flipped bytes loaded silently before checksums (val loss 3.38 -> 4.92 on resume); now they name the file."""
    good = save(tmp_path, 1)
    bad = save(tmp_path, 2)
    f = bad / name
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: corrupt checkpoint file, its SHA-256 differs"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model(bad)
    with pytest.warns(CheckpointWarning, match=rf"skipped checkpoint-2: .*{re.escape(name)}.*SHA-256"):
        assert latest_checkpoint(tmp_path) == good
    found, skipped = find_latest_checkpoint(tmp_path)
    assert found == good and [p for p, _ in skipped] == [bad]


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a file that would run code on load is an error, not an execution, and the
    message does not relay torch's advice to retry with weights_only=False."""
    path = save(tmp_path, 1)
    torch.save({"payload": Path("/")}, path / "training_state.pt")  # an arbitrary class in the pickle
    rewrite_manifest_entry(path, "training_state.pt")
    with pytest.raises(CheckpointError, match="training_state.pt: corrupt or unreadable") as info:
        load_checkpoint(path)
    assert "Re-running" not in str(info.value) and "\n" not in str(info.value)


def test_weights_are_safetensors_and_load_with_no_pickle(tmp_path, monkeypatch):
    """Sampling a checkpoint reads safetensors weights, JSON and the tokenizer: nothing is unpickled."""
    torch.manual_seed(0)
    model = GPT(CFG)
    path = save(tmp_path, 1, model)
    assert not (path / "model.pt").exists()
    with open(path / "model.safetensors", "rb") as f:  # safetensors: an 8-byte length, then a JSON header
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))["wte.weight"]["dtype"] == "F32"

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle was used to load the weights")

    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, _, _ = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.lm_head.weight is loaded.wte.weight  # the tied weight was stored once and shared again
    ck = load_checkpoint(path, training_state=False)
    assert ck.step == 1 and ck.training_state == {}
    with pytest.raises(CheckpointError, match="pickle was used"):  # the optimizer state is still torch.save's
        load_checkpoint(path)


def test_checkpoint_written_before_safetensors_still_loads(tmp_path):
    """Format 1: model.pt (a weights_only pickle) and a manifest of sizes only."""
    torch.manual_seed(0)
    model = GPT(CFG)
    path = save(tmp_path, 4, model)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "model.pt")
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    files.pop("manifest.json")
    (path / "manifest.json").write_text(json.dumps({"format_version": 1, "step": 4, "files": files}))
    ck = load_checkpoint(path)
    assert ck.step == 4 and all(torch.equal(ck.model_state[k], v) for k, v in model.state_dict().items())
    assert latest_checkpoint(tmp_path) == path
    loaded, _, _ = load_model(path)
    assert torch.equal(loaded.wte.weight, model.wte.weight)


@pytest.mark.parametrize(
    "manifest, expected",
    [
        (b"\x8f\x00garbage\xff", "manifest.json: corrupt manifest .*not UTF-8"),
        (b"", "manifest.json: corrupt manifest .*malformed JSON"),
        (b'{"files": {"a": 1}, "files": {}}', "manifest.json: corrupt manifest .*appears twice"),
        (b'{"files": {"../../etc/passwd": 5}}', "manifest.json: corrupt manifest .*bad entry"),
        (b'{"files": {"model.safetensors": "big"}}', "manifest.json: corrupt manifest"),
        (b"[1, 2]", "manifest.json: corrupt manifest .*expected a JSON object"),
        (b'{"files": {}}', "the manifest lists no model weights"),
    ],
    ids=["bytes", "empty", "duplicate", "outside", "size-text", "list", "no-weights"],
)
def test_damaged_manifest_is_a_clear_error(tmp_path, manifest, expected):
    path = save(tmp_path, 1)
    (path / "manifest.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\xff\xfe\x00garbage", "config.json: corrupt config .*not UTF-8"),
        (b'{"d_model": 32, "d_model": 64}', "config.json: corrupt config .*appears twice"),
        (b'{"d_model": -1}', "config.json: corrupt config .*field 'd_model'"),
    ],
    ids=["bytes", "duplicate", "bad-field"],
)
def test_damaged_config_in_a_checkpoint_is_a_clear_error(tmp_path, content, expected):
    path = save(tmp_path, 1)
    (path / "config.json").write_bytes(content)
    rewrite_manifest_entry(path, "config.json")  # the checksum matches: only the content is wrong
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path):
    path = save(tmp_path, 1)
    other = GPT(CFG.replace(d_model=64, n_heads=2))
    save_weights(other.state_dict(), path / "model.safetensors")
    rewrite_manifest_entry(path, "model.safetensors")
    with pytest.raises(CheckpointError, match="weights do not fit the checkpoint's config"):
        load_model(path)


def test_a_full_disk_during_a_save_is_a_checkpoint_error_and_keeps_the_last_one(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError, not OSError: the save turns both into one clear error."""
    save(tmp_path, 1)

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint_module, "_torch_save", full_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: could not write .*full disk is the usual cause"):
        save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # no temporary folder left, the last one intact
    assert load_checkpoint(tmp_path / "checkpoint-1").step == 1


def test_rotation_moves_a_checkpoint_away_in_one_rename_before_deleting(tmp_path, monkeypatch):
    """A kill inside the delete leaves trash under a hidden name, never a half-deleted checkpoint-N."""
    for step in (1, 2):
        save(tmp_path, step)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill in the middle of deleting files

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, limit=2)
    monkeypatch.undo()
    names = sorted(os.listdir(tmp_path))
    assert names[1:] == ["checkpoint-2", "checkpoint-3"] and names[0].startswith(".trash-checkpoint-1-")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"]
    notices = clean_output_dir(tmp_path)
    assert len(notices) == 1 and "removed 1 leftover" in notices[0] and ".trash-checkpoint-1-" in notices[0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert clean_output_dir(tmp_path) == []


def test_latest_skips_a_checkpoint_without_its_weights(tmp_path):
    """What an interrupted rmtree (before rotation renamed first) left: a manifest but no weights."""
    save(tmp_path, 1)
    (save(tmp_path, 2) / "model.safetensors").unlink()
    with pytest.warns(CheckpointWarning, match="skipped checkpoint-2: .*model.safetensors is missing"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


# A child process saves checkpoint-1, then starts checkpoint-2 (or re-saves checkpoint-1)
# with a torch.save that writes half a file and hangs; the parent SIGKILLs it mid-save.
KILL_SCRIPT = """
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {here!r})
import minilm.checkpoint as C
from test_checkpoint import save

out, step = Path(sys.argv[1]), int(sys.argv[2])
save(out, 1)

def slow_save(obj, path):
    torch.save(obj, path)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)  # half written
    print("SAVING", flush=True)
    time.sleep(600)

C._torch_save = slow_save
save(out, step)
"""


@pytest.mark.parametrize("step", [2, 1], ids=["new-step", "same-step"])
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, step):
    script = tmp_path / "killme.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), here=str(Path(__file__).parent)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(step)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-checkpoint-") for p in out.iterdir())  # the half-written save
    assert list_checkpoints(out) == [out / "checkpoint-1"]
    ck = load_checkpoint(out / "checkpoint-1")
    assert ck.step == 1 and ck.training_state["sampler"] == {"step": 1}
    # The next save clears the debris.
    save(out, 3)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-3"]


def test_rotation_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    save(tmp_path, 5, limit=1)  # a run restarted in the same folder: its save is the newest, not the lowest
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-5"]


def test_rotation_deletes_a_replaced_runs_checkpoints_first(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step)
    # Resumed from checkpoint-2: 4, 6 and 8 belong to the replaced run and rank oldest.
    deleted = rotate_checkpoints(tmp_path, 2, newest=tmp_path / "checkpoint-2", stale_steps={4, 6, 8})
    assert deleted == [tmp_path / f"checkpoint-{s}" for s in (4, 6)]
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-8"]


def test_cuda_rng_state_is_this_devices_own(monkeypatch):
    """A checkpoint holds the CUDA generator of the device that trained, and each process restores it onto its own.

    Under DDP every rank seeds alike and draws the same dropout masks, so rank 0's GPU state is every rank's:
    rank r must put it on cuda:r (restoring a list of all GPUs' states gave rank r the untouched cuda:r state).
    No GPU here: torch.cuda's RNG functions are replaced by recorders.
    """
    calls = []

    def fake_get(device="cuda"):
        calls.append(("get", torch.device(device)))
        return torch.tensor([7], dtype=torch.uint8)

    def fake_set(new_state, device="cuda"):
        calls.append(("set", torch.device(device), new_state.tolist()))

    def every_gpu(*args):
        raise AssertionError("every GPU's RNG state was saved or restored, not this device's")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake_get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)

    state = rng_state(torch.device("cuda", 1))  # rank 0 of a run on GPUs 1..4
    assert calls == [("get", torch.device("cuda", 1))] and state["cuda"].tolist() == [7]
    set_rng_state(state, torch.device("cuda", 3))  # rank 2 of the resumed run puts it on its own GPU
    assert calls[-1] == ("set", torch.device("cuda", 3), [7])


def test_checkpoint_moved_aside_by_a_killed_resave_is_put_back(tmp_path):
    """Re-saving step N renames checkpoint-N to .old-checkpoint-N, then the new one into place. A kill between
    the two renames leaves only .old-checkpoint-N: listing, loading and the next save must put it back, not
    delete it as debris."""
    old = tmp_path / ".old-checkpoint-5"
    save(tmp_path, 5).rename(old)  # the state on disk after such a kill ...
    (tmp_path / ".tmp-checkpoint-5-abc").mkdir()  # ... with the new save's temporary folder
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-5"] and not old.exists()

    (tmp_path / "checkpoint-5").rename(old)
    assert load_checkpoint(tmp_path / "checkpoint-5").step == 5

    (tmp_path / "checkpoint-5").rename(old)
    save(tmp_path, 6)  # the next save clears the temporary folder, not the moved-aside checkpoint
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5", "checkpoint-6"]
    assert load_checkpoint(tmp_path / "checkpoint-5").step == 5


def test_resave_survives_a_reader_putting_the_old_one_back_midway(tmp_path, monkeypatch):
    """A reader (another process listing the folder) between the re-save's two renames restores the old
    checkpoint-N; the save moves it aside again instead of failing."""
    first = GPT(CFG)
    save(tmp_path, 5, first)
    real_replace, raced = os.replace, []

    def racing_replace(src, dst):
        if Path(src).name.startswith(".tmp-checkpoint-") and not raced:
            raced.append(list_checkpoints(tmp_path))  # the old one is aside now: the reader puts it back
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    second = GPT(CFG)  # other weights: the global RNG moved on
    assert not torch.equal(second.wte.weight, first.wte.weight)
    save(tmp_path, 5, second)
    assert raced == [[tmp_path / "checkpoint-5"]]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint-5").model_state["wte.weight"], second.wte.weight)
