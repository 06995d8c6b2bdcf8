"""FSDP2 on CPU: torchrun --nproc_per_node=2 with parallelism 'fsdp' equals one process on the same global batch.

Tolerance: fp32 throughout; sharded gradients are reduce-scattered (a sum of the two ranks'
gradients in another order than one process's backward), so they agree to rtol 1e-5 /
atol 1e-7, the same as DDP's check, and losses to rel 1e-4 over a 4-step run.
"""

import json
from pathlib import Path

import pytest
import torch

from minilm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# Each rank computes the gradients of one step (2 micro-batches, so the no-sync path runs),
# gathers its sharded gradients into whole ones and saves them with its batches; then it
# runs the command line with parallelism fsdp (checkpoints at steps 2 and 4, a sample at the end).
RANK_SCRIPT = """
import sys, torch
from minilm.cli import main
from minilm.config import load_config
from minilm.trainer import Trainer

config, out = sys.argv[1], sys.argv[2]
trainer = Trainer(load_config(config, {"world_size": 2, "parallelism": "fsdp"}), progress=False, verbose=False,
                  sample_tokens=0)
batches = trainer.next_micro_batches()
loss = trainer.compute_gradients(batches)
grads = {n: p.grad.full_tensor() for n, p in trainer.raw_model.named_parameters()}
shard = {n: p.grad.to_local().numel() for n, p in trainer.raw_model.named_parameters()}
zero2 = Trainer(load_config(config, {"world_size": 2, "parallelism": "fsdp", "reshard_after_forward": False}),
                progress=False, verbose=False, sample_tokens=0)
zero2_loss = zero2.compute_gradients(batches)
zero2_grads = {n: p.grad.full_tensor() for n, p in zero2.raw_model.named_parameters()}
torch.save({"batches": batches, "grads": grads, "loss": loss, "shard": shard, "zero2_grads": zero2_grads,
            "zero2_loss": zero2_loss}, f"{out}/rank{trainer.dist.rank}.pt")
sys.exit(main(["--config", config, "--world_size", "2", "--parallelism", "fsdp", "--output_dir", f"{out}/run",
               "--no_progress"]))
"""


@pytest.fixture(scope="module")
def launched(two_ranks):
    """RANK_SCRIPT under torchrun --nproc_per_node=2 (gloo), once for this file."""
    return two_ranks("fsdp", RANK_SCRIPT, timeout=400)


def test_fsdp_gradients_and_loss_equal_one_process_on_the_global_batch(launched, one_process_on_the_global_batch):
    r0, r1, single, loss = one_process_on_the_global_batch(launched)
    n_total = sum(p.numel() for p in single.raw_model.parameters())
    assert sum(r0["shard"].values()) < n_total  # each rank really held a shard, not the whole gradient
    torch.testing.assert_close((r0["zero2_loss"] + r1["zero2_loss"]) / 2, loss)
    for name, p in single.raw_model.named_parameters():
        for r in (r0, r1):  # ZeRO-3 (reshard after forward) and ZeRO-2 (keep the gathered blocks)
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(r["zero2_grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_run_follows_the_one_process_curve_and_resumes_on_one_process(launched, monkeypatch):
    tmp, cfg, cfg_path, env, out, stdout = launched
    run = out / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "eval", "train", "train", "eval"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    # checkpoint_format 'auto': two FSDP processes write shards (dcp/), no gathered model.safetensors
    assert (run / "checkpoint-2" / "dcp" / ".metadata").is_file() and not (
        run / "checkpoint-2" / "model.safetensors"
    ).exists()
    fsdp_losses = [r["loss"] for r in records if r["kind"] == "train"]

    monkeypatch.setenv("MINILM_CACHE", env["MINILM_CACHE"])
    single = Trainer(cfg.replace(batch_size=4), progress=False, verbose=False, sample_tokens=0).train()
    assert fsdp_losses == pytest.approx(single.losses, rel=1e-4)

    # The checkpoint the two processes wrote is one plain file: one process with the same global
    # batch resumes from it and continues the same curve (world size 2 -> 1).
    resumed = Trainer(
        cfg.replace(batch_size=4, output_dir=str(tmp / "resumed")),
        progress=False,
        verbose=False,
        sample_tokens=0,
        resume_from_checkpoint=run / "checkpoint-2",
    ).train()
    assert resumed.losses[-2:] == pytest.approx(fsdp_losses[2:], rel=1e-4)
