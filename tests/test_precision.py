"""The precision rules: which autocast dtype a config gets on each kind of device, and why."""

import contextlib

import pytest
import torch

import minilm.precision as precision
from minilm import Config
from minilm.precision import autocast_context, autocast_dtype, cpu_supports_bf16, describe_precision

FP32, BF16, FP16 = Config(), Config(bf16=True), Config(fp16=True)


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend this CPU does (True) or does not (False) multiply bf16 natively."""

    def set_native(value: bool):
        monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: value)

    return set_native


def test_fp32_config_never_autocasts(native_bf16):
    native_bf16(True)
    for device in ("cpu", "cuda", "mps"):
        assert autocast_dtype(FP32, device) is None
        assert autocast_dtype(FP32, device, cpu_bf16=True) is None
    assert describe_precision(FP32, "cpu") == "fp32"


@pytest.mark.parametrize("cfg", [BF16, FP16], ids=["bf16", "fp16"])
def test_cpu_runs_bf16_only_where_native(native_bf16, cfg):
    native_bf16(True)
    assert autocast_dtype(cfg, "cpu") == torch.bfloat16  # fp16 becomes bf16 on a CPU: no scaler needed
    native_bf16(False)
    assert autocast_dtype(cfg, "cpu") is None
    assert "no native bf16" in describe_precision(cfg, "cpu")


def test_cpu_bf16_switch_overrides_the_hardware_check(native_bf16):
    native_bf16(False)
    assert autocast_dtype(BF16, "cpu", cpu_bf16=True) == torch.bfloat16
    assert "emulated" in describe_precision(BF16, "cpu", cpu_bf16=True)
    native_bf16(True)
    assert autocast_dtype(BF16, "cpu", cpu_bf16=False) is None
    assert "cpu_bf16=False" in describe_precision(BF16, "cpu", cpu_bf16=False)
    assert describe_precision(BF16, "cpu", cpu_bf16=True) == "bf16 autocast"  # native: nothing emulated


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_bf16_falls_back_to_fp16_on_older_gpus(monkeypatch, bf16_supported, expected):
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # torch's default counts emulation: a T4 or V100 would pass it and run bf16 slowly.
        assert including_emulation is False, "ask for native bf16, not emulated"
        return bf16_supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert autocast_dtype(BF16, "cuda") == expected
    assert autocast_dtype(BF16, "cuda", cpu_bf16=False) == expected  # the CPU switch leaves GPUs alone
    assert autocast_dtype(FP16, "cuda") == torch.float16
    if not bf16_supported:
        assert describe_precision(BF16, "cuda") == "fp16 autocast (bf16 requested; cuda runs fp16)"


def test_other_accelerators_get_what_was_asked():
    # (Apple's MPS has rules of its own: tests/test_mps.py.)
    assert autocast_dtype(BF16, "xpu") == torch.bfloat16
    assert autocast_dtype(FP16, "xpu") == torch.float16


def test_autocast_context():
    assert isinstance(autocast_context("cpu", None), contextlib.nullcontext)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    "machine, flags, expected",
    [
        ("x86_64", {"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),
        ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),
        ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False),
        ("riscv64", {"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": True}, False),
    ],
)
def test_cpu_feature_detection(monkeypatch, machine, flags, expected):
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    for name, value in flags.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert cpu_supports_bf16.__wrapped__() is expected  # __wrapped__: bypass the cache


@pytest.mark.parametrize("features, expected", [("fp asimd bf16 i8mm", True), ("fp asimd", False)])
def test_arm_feature_detection(monkeypatch, tmp_path, features, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nFeatures\t: {features}\n")
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    assert cpu_supports_bf16.__wrapped__() is expected
