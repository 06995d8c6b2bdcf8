"""Fixtures shared by the test files: one CPU thread, a micro model on a slice of Shakespeare, a graph tracer."""

from pathlib import Path

import pytest
import torch

from minilm import Config
from minilm.data import load_text

# A 2-layer, d_model 32 model on 16-character sequences: a training step takes milliseconds.
MICRO = dict(
    vocab_size=72,  # the distinct characters of the micro corpus
    d_model=32,
    n_heads=2,
    n_layers=2,
    max_seq_len=16,
    tokenizer="char",
    learning_rate=3e-3,
    batch_size=4,
    eval_batches=2,
    device="cpu",
)


@pytest.fixture
def one_thread():
    """Micro models gain nothing from more threads, and on a busy machine idle-spinning threads cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory) -> Path:
    """The first 40,000 characters of the bundled Shakespeare, as a text file."""
    path = tmp_path_factory.mktemp("data") / "micro.txt"
    path.write_text(load_text("shakespeare")[:40_000])
    return path


@pytest.fixture(scope="session")
def micro_config(micro_corpus):
    """``micro_config(output_dir, **changes)``: a :data:`MICRO` config trained on :func:`micro_corpus`."""

    def make(output_dir, **changes) -> Config:
        return Config(**{**MICRO, "dataset": str(micro_corpus), "output_dir": str(output_dir), **changes})

    return make


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory, micro_config):
    """``two_ranks(name, script, timeout)``: run ``script`` under torchrun --nproc_per_node=2 (gloo).

    The script gets a micro config's JSON path and an output folder as its arguments; returns
    (scratch folder, that config, its path, the child environment, output folder, stdout).
    """
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(name: str, script: str, timeout: int = 300):
        tmp = tmp_path_factory.mktemp(name)
        cfg = micro_config(
            tmp / "single",
            dropout=0.0,
            batch_size=2,
            grad_accumulation_steps=2,
            max_steps=4,
            warmup_steps=1,
            eval_steps=2,
            save_steps=2,
        )
        cfg_path = tmp / "micro.json"
        cfg.save(cfg_path)
        env = dict(os.environ, MINILM_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        (tmp / f"{name}_check.py").write_text(script)
        out = tmp / name
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        proc = subprocess.run(
            [*cmd, str(tmp / f"{name}_check.py"), str(cfg_path), str(out)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return tmp, cfg, cfg_path, env, out, proc.stdout

    return run


@pytest.fixture
def one_process_on_the_global_batch(monkeypatch):
    """``one_process_on_the_global_batch(launched)``: a :func:`two_ranks` run's saved step beside one process."""
    return lambda launched: _one_process_on_the_global_batch(launched, monkeypatch)


def _one_process_on_the_global_batch(launched, monkeypatch):
    """The 2-rank run's saved step beside one process on both ranks' data (twice the batch).

    Checks that micro-batch m of the one process is rank 0's then rank 1's micro-batch m (disjoint
    shares) and that the mean loss agrees; returns (rank 0's record, rank 1's, the one-process
    trainer with its gradients computed, its loss).
    """
    from minilm.trainer import Trainer

    tmp, cfg, cfg_path, env, out, _ = launched
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    monkeypatch.setenv("MINILM_CACHE", env["MINILM_CACHE"])
    single = Trainer(cfg.replace(batch_size=4), progress=False, verbose=False, sample_tokens=0)
    batches = single.next_micro_batches()
    for m, (x, y) in enumerate(batches):
        assert torch.equal(x, torch.cat([r0["batches"][m][0], r1["batches"][m][0]]))
        assert torch.equal(y, torch.cat([r0["batches"][m][1], r1["batches"][m][1]]))
    loss = single.compute_gradients(batches)
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, loss)
    return r0, r1, single, loss


class GraphTracer:
    """torch.compile through AOTAutograd without generating code, noting each graph's operators.

    ``compile(module)`` returns the compiled module; after a call, ``graphs['forward']`` and (after a
    backward) ``graphs['backward']`` hold the operator names of the last graphs traced, e.g.
    'minilm.gelu.default'. ``outputs_and_grads`` runs the compiled module and then the module itself.
    """

    def __init__(self):
        self.graphs: dict[str, set[str]] = {}

    def _keep(self, kind: str):
        from functorch.compile import make_boxed_func

        def compiler(gm, _):
            self.graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm)

        return compiler

    def compile(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch._dynamo.backends.common import aot_autograd

        return torch.compile(
            module, backend=aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))
        )

    def outputs_and_grads(self, module, x, loss, context=None):
        """[(output, [parameter gradients]) compiled, (...) eager] of ``loss(module(x)).backward()``."""
        import contextlib

        results = []
        for m in (self.compile(module), module):
            module.zero_grad()
            with context() if context else contextlib.nullcontext():
                y = m(x)
            loss(y).backward()
            results.append((y.detach(), [p.grad.clone() for p in module.parameters()]))
        return results


@pytest.fixture
def tracer() -> GraphTracer:
    return GraphTracer()
