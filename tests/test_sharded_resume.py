"""Sharded checkpoints in training runs: 4 FSDP processes -> 2 -> 1 continue the uninterrupted loss curve.

The 4-process run (batch_size 1, 2 micro-batches, 6 steps) is the uninterrupted reference. A
2-process run (batch_size 2: the same global batch) resumes its step-2 checkpoint, and one process
(batch_size 4) resumes the 2-process run's step-4 checkpoint through ``--resume_from_checkpoint
latest``. Tolerance: fp32, dropout 0; the data and the weights are the same, only the order in
which gradients are summed (reduce-scatter over 4, 2 or 1 processes) differs, so losses agree to
rel 1e-5 (measured: about 1e-7).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilm import checkpoint as ckpt_io
from minilm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from minilm.cli import main
from minilm.sharded_checkpoint import export_plain, read_whole
from minilm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = "import sys\nfrom minilm.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def torchrun(n: int, args: list, env: dict, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    proc = subprocess.run(
        [*cmd, str(cwd / "cli.py"), *map(str, args), "--no_progress"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_config):
    """(scratch folder, child env, 4-process run, 2-process run resumed from its step 2, its stdout)."""
    tmp = tmp_path_factory.mktemp("sharded_resume")
    schedule = {"max_steps": 6, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2}
    cfg = micro_config(tmp / "unused", dropout=0.0, batch_size=1, grad_accumulation_steps=2, **schedule)
    cfg.save(tmp / "micro.json")
    (tmp / "cli.py").write_text(CLI)
    env = dict(os.environ, MINILM_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    common = ["--config", tmp / "micro.json", "--parallelism", "fsdp"]
    run4, run2 = tmp / "run4", tmp / "run2"
    torchrun(4, [*common, "--world_size", "4", "--output_dir", run4], env, tmp)
    resume = ["--resume_from_checkpoint", run4 / "checkpoint-2"]
    out2 = torchrun(2, [*common, "--world_size", "2", "--batch_size", "2", "--output_dir", run2, *resume], env, tmp)
    return tmp, env, run4, run2, out2


def test_every_rank_writes_its_shard_into_one_checksummed_folder(runs):
    _, _, run4, run2, _ = runs
    assert [p.name for p in list_checkpoints(run4)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    ck = run4 / "checkpoint-2"
    shards = sorted(p.name for p in (ck / "dcp").iterdir() if p.suffix == ".distcp")
    assert len(shards) == 4 and not (ck / "model.safetensors").exists(), shards
    manifest = json.loads((ck / "manifest.json").read_text())
    on_disk = {str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk  # every shard, the DCP index, state, config and tokenizer
    assert {"dcp/.metadata", "training_state.pt", "config.json"} <= on_disk
    assert len([p for p in (run2 / "checkpoint-4" / "dcp").iterdir() if p.suffix == ".distcp"]) == 2
    assert latest_checkpoint(run4) == run4 / "checkpoint-6"
    assert not [p.name for p in run4.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_four_processes_resume_on_two_and_continue_the_curve(runs):
    _, _, run4, run2, out2 = runs
    ref, resumed = losses(run4), losses(run2)
    assert sorted(resumed) == [3, 4, 5, 6]
    assert [resumed[s] for s in resumed] == pytest.approx([ref[s] for s in resumed], rel=REL)
    assert "resuming a 4-process run on 2 process(es)" in out2 and "global batch is unchanged (4 sequences)" in out2
    # The weights at the end agree too (each read whole from its own shards).
    w4, _ = read_whole(run4 / "checkpoint-6")
    w2, _ = read_whole(run2 / "checkpoint-6")
    for name, value in w4.items():
        torch.testing.assert_close(w2[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_damaged_shard_is_named_latest_skips_it_and_one_process_resumes(runs, tmp_path, monkeypatch, capsys):
    tmp, env, run4, run2, _ = runs
    run1 = tmp_path / "run1"
    shutil.copytree(run2, run1)
    shard = run1 / "checkpoint-6" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: corrupt checkpoint file, its SHA-256 differs"):
        load_checkpoint(run1 / "checkpoint-6")

    monkeypatch.setenv("MINILM_CACHE", env["MINILM_CACHE"])
    args = ["--config", str(tmp / "micro.json"), "--batch_size", "4", "--output_dir", str(run1)]
    assert main([*args, "--no_progress", "--resume_from_checkpoint", "latest"]) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint-6" in err and "__1_0.distcp" in err, err
    ref, resumed = losses(run4), losses(run1)
    assert [resumed[5], resumed[6]] == pytest.approx([ref[5], ref[6]], rel=REL)
    # One process saves whole-model checkpoints ('auto'); the re-saved step 6 replaced the damaged one.
    assert (run1 / "checkpoint-6" / "model.safetensors").is_file()
    assert not ckpt_io.is_sharded_checkpoint(run1 / "checkpoint-6")


def test_sample_and_export_read_a_sharded_checkpoint(runs, tmp_path, capsys):
    _, _, run4, _, _ = runs
    sharded = run4 / "checkpoint-6"
    plain = export_plain(sharded, tmp_path / "plain")
    assert load_checkpoint(plain).config.world_size == 1 and (plain / "tokenizer").is_dir()
    texts = []
    for path in (sharded, plain):
        assert main(["sample", "--checkpoint", str(path), "--max_new_tokens", "20", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 10
    assert main(["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_one_process_sharded_run_resumes_exactly_and_rotates(micro_config, tmp_path):
    """checkpoint_format 'sharded' without a process group: rotation, latest and a bit-exact resume."""
    cfg = micro_config(
        tmp_path / "run",
        checkpoint_format="sharded",
        max_steps=6,
        warmup_steps=1,
        eval_steps=3,
        save_steps=2,
        save_total_limit=2,
    )
    whole = Trainer(cfg, progress=False, verbose=False, sample_tokens=0).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-6"]
    assert ckpt_io.is_sharded_checkpoint(tmp_path / "run" / "checkpoint-4")
    resumed = Trainer(
        cfg.replace(output_dir=str(tmp_path / "resumed")),
        progress=False,
        verbose=False,
        sample_tokens=0,
        resume_from_checkpoint=tmp_path / "run" / "checkpoint-4",
    ).train()
    assert resumed.losses[-2:] == whole.losses[-2:]  # one process, same shapes: bit for bit


def test_a_dcp_index_with_code_in_it_is_refused(tmp_path):
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable DCP index .*refused"):
        read_whole(tmp_path)


def test_a_failed_shard_write_is_one_checkpoint_error_and_leaves_nothing(micro_config, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    from minilm.model import GPT
    from minilm.sharded_checkpoint import save_sharded

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    cfg = micro_config(tmp_path / "run")
    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint-3: could not write the shards .*No space left"):
        save_sharded(tmp_path / "run", 3, GPT(cfg), None, training_state={}, config=cfg)
    assert list((tmp_path / "run").iterdir()) == []  # neither checkpoint-3 nor its temporary folder


def test_the_resume_note_says_what_is_exact_at_another_world_size(micro_config, tmp_path):
    from types import SimpleNamespace

    from minilm.resume import world_size_note

    ck = SimpleNamespace(config=micro_config(tmp_path, world_size=4, batch_size=1, dropout=0.0))
    assert world_size_note(ck, micro_config(tmp_path, world_size=4, batch_size=1, dropout=0.0)) is None
    same = world_size_note(ck, micro_config(tmp_path, world_size=2, batch_size=2, dropout=0.0))
    other = world_size_note(ck, micro_config(tmp_path, world_size=2, batch_size=1, dropout=0.1))
    assert "4-process run on 2 process(es)" in same and "unchanged (4 sequences)" in same and "Dropout" not in same
    assert "changed (4 -> 2 sequences" in other and "Dropout masks" in other
