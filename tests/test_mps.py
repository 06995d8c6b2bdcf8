"""Apple GPUs (device 'mps'): the device, precision and memory logic, with stand-ins on a Linux CPU.

No Mac runs these tests. ``torch.backends.mps.is_available`` (and, for bf16, the macOS check)
are replaced by stand-ins, so what is tested is minilm's decisions, not PyTorch's MPS kernels.
"""

import pytest
import torch

from minilm import distributed, precision
from minilm.cli import main
from minilm.config import Config, ConfigError
from minilm.memory import estimate_training_memory
from minilm.precision import mixed_precision as trainer_precision


@pytest.fixture
def mac(monkeypatch):
    """A Mac with an Apple GPU and no CUDA, on macOS 14, as far as minilm can tell."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 14)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return monkeypatch


def test_config_accepts_mps_and_names_the_field_for_typos():
    assert Config(device="mps").device == "mps"
    with pytest.raises(ConfigError, match="field 'device'.*'mps'"):
        Config(device="metal")


def test_auto_picks_mps_when_present_and_cuda_is_not(mac):
    assert distributed.local_device("auto") == torch.device("mps")
    assert distributed.local_device("mps") == torch.device("mps")
    assert distributed.local_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_over_mps(mac):
    mac.setattr(torch.cuda, "is_available", lambda: True)
    mac.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.local_device("auto") == torch.device("cuda", 0)


def test_auto_is_cpu_without_either(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device("auto") == torch.device("cpu")


def test_mps_requested_without_an_apple_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="field 'device' is 'mps' but no Apple GPU"):
        distributed.local_device("mps")


def test_mps_under_torchrun_is_refused(mac):
    mac.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="field 'device' is 'mps'.*torchrun"):
        distributed.local_device("mps")


# (torch version, macOS 14 or newer, fields) -> the autocast dtype on MPS
CASES = [
    ("2.13.0", True, {}, None),
    ("2.13.0", True, {"fp16": True}, torch.float16),
    ("2.13.0", True, {"bf16": True}, torch.bfloat16),
    ("2.13.0", False, {"bf16": True}, torch.float16),  # macOS 13: no bf16 on the GPU
    ("2.8.0", True, {"fp16": True}, torch.float16),
    ("2.7.1", True, {"fp16": True}, torch.bfloat16),  # fp16 autocast but no gradient scaler on MPS yet
    ("2.7.1", False, {"fp16": True}, None),
    ("2.6.0", True, {"bf16": True}, torch.bfloat16),
    ("2.5.1", True, {"bf16": True}, None),  # bf16 autocast on MPS came in 2.6
    ("2.5.1", True, {"fp16": True}, None),
]


@pytest.mark.parametrize(("version", "sonoma", "fields", "expected"), CASES)
def test_precision_rules_on_mps(mac, version, sonoma, fields, expected):
    mac.setattr(torch, "__version__", version)
    mac.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: sonoma)
    cfg = Config(**fields)
    assert precision.autocast_dtype(cfg, torch.device("mps")) == expected
    text = precision.describe_precision(cfg, "mps")
    if expected is None and fields:
        assert text.startswith("fp32 (") and "MPS" in text and version in text
    elif expected is not None:
        assert text.startswith({torch.float16: "fp16", torch.bfloat16: "bf16"}[expected] + " autocast")


def test_trainer_precision_switch_on_mps(mac):
    ctx, scaler, name = trainer_precision(Config(fp16=True), torch.device("mps"))
    assert isinstance(ctx, torch.autocast) and ctx.device == "mps" and ctx.fast_dtype == torch.float16
    assert scaler.is_enabled() and name == "fp16 autocast + gradient scaler"
    ctx, scaler, name = trainer_precision(Config(bf16=True), torch.device("mps"))
    assert ctx.fast_dtype == torch.bfloat16 and not scaler.is_enabled()


def test_cpu_rules_are_unchanged_by_the_mps_branch(mac):
    assert precision.autocast_dtype(Config(bf16=True), "cpu", cpu_bf16=False) is None
    assert precision.autocast_dtype(Config(fp16=True), "cpu", cpu_bf16=True) == torch.bfloat16


def test_memory_estimate_on_mps_is_labelled_unvalidated():
    cfg = Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, batch_size=2)
    mps = estimate_training_memory(cfg, device_type="mps")
    cuda = estimate_training_memory(cfg, device_type="cuda")
    assert not mps.validated and cuda.validated and estimate_training_memory(cfg, device_type="cpu").validated
    assert mps.peak_bytes == cuda.peak_bytes  # CUDA's kernel assumptions, borrowed
    assert "unvalidated on mps" in mps.table() and "unvalidated" not in cuda.table()
    assert "unvalidated on mps" in mps.table(fmt="markdown")
    with pytest.raises(ValueError, match="'mps'"):
        estimate_training_memory(cfg, device_type="xpu")


def test_sample_command_names_the_device_field_without_an_apple_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(tmp_path), "--device", "mps"])
    assert e.value.code == 2
    assert "field 'device' is 'mps' but no Apple GPU" in capsys.readouterr().err
