"""The benchmark scripts run end to end (on a shape small enough for a unit test) and report what they promise."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# A stand-in for nanoGPT's model.py (no network in tests): its class names, config fields,
# state-dict keys and forward signature, built from torch modules like the original.
NANOGPT_STANDIN = """
from dataclasses import dataclass
import torch
import torch.nn as nn
from torch.nn import functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head = c.n_head
    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, bias=c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = nn.LayerNorm(c.n_embd, bias=c.bias), MLP(c)
    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]), ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        print("number of parameters: (printed by nanoGPT)")
    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
"""


def test_train_throughput_reports_ratios_profiles_and_loss_curves(tmp_path, capsys):
    from minilm.precision import cpu_supports_bf16

    bench = load("train_throughput")
    nanogpt = tmp_path / "model.py"
    nanogpt.write_text(NANOGPT_STANDIN)
    argv = [
        "--configs",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--threads",
        "1",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--peak-size",
        "128",
        "--profile-steps",
        "1",
        "--nanogpt",
        str(nanogpt),
    ]
    results = bench.main([*argv, "--curve-steps", "3", "--cache-dir", str(tmp_path), "--save", str(tmp_path / "rec")])
    tiny = results["tiny"]
    # same weights in all three models: the same loss before training
    assert tiny["first_loss"]["minilm"] == pytest.approx(tiny["first_loss"]["HF GPT-2"], abs=1e-4)
    assert tiny["first_loss"]["minilm"] == pytest.approx(tiny["first_loss"]["nanoGPT"], abs=1e-4)
    fp32 = {"minilm fp32 / HF fp32", "minilm fp32 / nanoGPT fp32"}
    # tiny ships fp32 and is too short a run to compile: its default is fp32 eager on any CPU
    assert tiny["default"] == {"precision": "fp32", "compile": False, "reason": tiny["default"]["reason"]}
    assert tiny["default"]["reason"].startswith("eager: ")
    default = {
        "minilm default (fp32) / HF default (fp32)",
        "minilm default (fp32) / nanoGPT default (fp32)",
        "minilm bf16 / nanoGPT bf16",
        "minilm bf16 / minilm bf16 before",
        "minilm bf16 / minilm fp32",
    }
    native = cpu_supports_bf16()
    assert set(tiny["ratios"]) == (fp32 | default if native else fp32)  # fp32 only without native bf16
    assert all(r > 0 and math.isfinite(r) for r in tiny["ratios"].values())
    profiles = tiny["profiles"]
    assert "nanoGPT fp32" in profiles and "minilm fp32" in profiles
    for rows in profiles.values():  # matmuls summed on the first row, then the costliest other operators
        assert rows[0][0] == "(all matmuls)" and all(op not in ("mm", "addmm") for op, _, _ in rows[1:])
    out = capsys.readouterr().out
    assert "CPU: " in out and ("native bf16" in out)
    assert "tiny: minilm's default on this CPU is fp32, eager: " in out and "allocator: " in out
    assert "target >= 1.0x" in out and "top non-matmul operators" in out
    if native:
        assert len(tiny["curves"]["fp32"]) == len(tiny["curves"]["bf16"]) == 3 and "max |fp32 - bf16|" in out
    else:
        assert "no native bf16" in out and "only the fp32 ratios" in out
    saved = list((tmp_path / "rec").glob("*.json"))
    assert len(saved) == 1 and "cpu" in saved[0].name


def test_train_throughput_without_nanogpt_or_native_bf16_reports_fp32_against_hugging_face(monkeypatch, capsys):
    bench = load("train_throughput")
    monkeypatch.setattr(bench, "cpu_supports_bf16", lambda: False)  # as on a CPU without bf16 units
    argv = ["--configs", "tiny", "--batch", "2", "--seq", "8", "--threads", "1", "--rounds", "1", "--steps", "1"]
    results = bench.main([*argv, "--peak-size", "64", "--curve-steps", "3", "--profile-steps", "0"])
    assert set(results["tiny"]["ratios"]) == {"minilm fp32 / HF fp32"}
    assert "curves" not in results["tiny"] and "profiles" not in results["tiny"]
    out = capsys.readouterr().out
    assert "no native bf16" in out and "only the fp32 ratios" in out


def test_train_throughput_default_follows_the_trainer_precision_and_compile_policy():
    """small (bf16, 10,000 steps) runs bf16 where the CPU has it and compiles; tiny (fp32, 600 steps) neither."""
    from minilm.precision import cpu_supports_bf16

    bench = load("train_throughput")
    small, tiny = bench.trainer_default("small"), bench.trainer_default("tiny")
    assert small.compile and small.reason.startswith("torch.compile: ")
    assert small.precision == ("bf16" if cpu_supports_bf16() else "fp32")
    assert small.label == small.precision + " compiled"
    assert (tiny.precision, tiny.compile, tiny.label) == ("fp32", False, "fp32")
