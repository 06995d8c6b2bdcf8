"""DDP on CPU: torchrun --nproc_per_node=2 with gloo equals one process on the same global batch."""

import json
from pathlib import Path

import pytest
import torch

from minilm import Config
from minilm.config import ConfigError
from minilm.distributed import check_world_size
from minilm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# One torchrun launch does both checks. Each rank first computes the gradients of one step
# (2 micro-batches, so DDP's no_sync runs too) and saves its batches and its all-reduced
# gradients; then it runs the command line, exactly as `torchrun ... train.py` would.
RANK_SCRIPT = """
import sys, torch
from minilm.cli import main
from minilm.config import load_config
from minilm.trainer import Trainer

config, out = sys.argv[1], sys.argv[2]
trainer = Trainer(load_config(config, {"world_size": 2}), progress=False, verbose=False, sample_tokens=0)
batches = trainer.next_micro_batches()
loss = trainer.compute_gradients(batches)
grads = {n: p.grad for n, p in trainer.raw_model.named_parameters()}
torch.save({"batches": batches, "grads": grads, "loss": loss}, f"{out}/rank{trainer.dist.rank}.pt")
sys.exit(main(["--config", config, "--world_size", "2", "--output_dir", f"{out}/run", "--no_progress"]))
"""


@pytest.fixture(scope="module")
def launched(two_ranks):
    """RANK_SCRIPT under torchrun --nproc_per_node=2 (gloo), once for this file."""
    return two_ranks("ddp", RANK_SCRIPT, timeout=300)


def test_world_size_is_checked_against_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_world_size(Config(world_size=1))
    with pytest.raises(ConfigError, match=r"'world_size' is 4 but this is a single process.*--nproc_per_node=4"):
        check_world_size(Config(world_size=4))
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(Config(world_size=2))
    with pytest.raises(ConfigError, match=r"'world_size' is 1 but the launcher started 2 processes.*--world_size 2"):
        check_world_size(Config(world_size=1))


def test_two_processes_equal_one_process_on_the_global_batch(launched, one_process_on_the_global_batch):
    r0, r1, single, loss = one_process_on_the_global_batch(launched)
    for name, p in single.raw_model.named_parameters():
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name  # DDP left the ranks identical
        torch.testing.assert_close(r0["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_torchrun_cli_run_and_only_rank0_writes(launched, monkeypatch):
    tmp, cfg, cfg_path, env, out, stdout = launched
    assert stdout.count("non-embedding") == 1  # the parameter table, printed by rank 0 only
    assert "2 processes" in stdout
    run = out / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "eval", "train", "train", "eval"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]

    # The same run in one process with twice the batch follows the same loss curve.
    monkeypatch.setenv("MINILM_CACHE", env["MINILM_CACHE"])
    single = Trainer(cfg.replace(batch_size=4), progress=False, verbose=False, sample_tokens=0).train()
    ddp_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert ddp_losses == pytest.approx(single.losses, rel=1e-4)


def test_leave_process_group_destroys_the_group_and_may_be_called_again(tmp_path):
    import torch.distributed as dist

    from minilm.distributed import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        leave_process_group()
        assert not dist.is_initialized()
        leave_process_group()  # nothing to leave: no error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
