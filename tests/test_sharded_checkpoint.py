"""DCP sharded checkpoints: written by 2 FSDP processes, resumed exactly by one, exported to a plain checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilm.checkpoint import CheckpointError, load_checkpoint
from minilm.config import Config
from minilm.model import GPT
from minilm.optim import make_optimizer
from minilm.sharded_checkpoint import export_plain, load_sharded

ROOT = Path(__file__).resolve().parents[1]
CFG = Config(vocab_size=256, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, batch_size=2, dropout=0.0)

# Two FSDP ranks take a step on their halves of a global batch of 4, save a sharded checkpoint,
# take a second step and write down the mean loss and the whole weights after it.
RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from minilm.config import Config
from minilm.distributed import apply_fsdp, full_model_state, leave_process_group
from minilm.model import GPT
from minilm.optim import make_optimizer
from minilm.sharded_checkpoint import save_sharded

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = Config(vocab_size=256, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, batch_size=2, dropout=0.0,
             world_size=2, parallelism="fsdp")
torch.manual_seed(0)
model = apply_fsdp(GPT(cfg), cfg)
opt = make_optimizer(model, cfg, verbose=False)
gen = torch.Generator().manual_seed(1)
batches = [torch.randint(0, 256, (4, 16), generator=gen) for _ in range(4)]

def step(i):
    x, y = batches[2 * i][2 * rank : 2 * rank + 2], batches[2 * i + 1][2 * rank : 2 * rank + 2]
    loss = model(x, y)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss / 2

step(0)
save_sharded(out, 1, model, opt, training_state={"note": "step one"}, config=cfg)
loss = step(1)
state = full_model_state(model)
if rank == 0:
    torch.save({"batches": batches, "loss": loss, "state": state}, f"{out}/after.pt")
leave_process_group()  # not destroy_process_group alone: see its docstring
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    script = tmp / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp)]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp


def test_each_rank_wrote_its_own_shard(saved):
    files = sorted(p.name for p in (saved / "checkpoint-1" / "dcp").iterdir())
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2, files
    assert not [p.name for p in saved.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_one_process_resumes_the_two_process_run_exactly(saved):
    after = torch.load(saved / "after.pt", weights_only=True)
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    model = GPT(CFG)
    opt = make_optimizer(model, CFG, verbose=False)
    assert load_sharded(saved / "checkpoint-1", model, opt) == 1
    x, y = after["batches"][2], after["batches"][3]  # the second step's global batch, both halves
    loss = model(x, y)[1]
    loss.backward()
    opt.step()
    # fp32; the two ranks' gradients are reduce-scattered (summed in another order)
    torch.testing.assert_close(loss.detach(), after["loss"], rtol=1e-6, atol=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, after["state"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_export_to_a_plain_checkpoint(saved, tmp_path):
    path = export_plain(saved / "checkpoint-1", tmp_path / "exported")
    ck = load_checkpoint(path)
    assert ck.step == 1 and ck.config.world_size == 1
    model = GPT(CFG)
    load_sharded(saved / "checkpoint-1", model)
    for name, value in model.state_dict().items():
        assert torch.equal(ck.model_state[name], value), name


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_sharded(tmp_path / "checkpoint-3", GPT(CFG))
