"""docs/benchmarks.md holds the numbers the library computes today.

Two checks: the page is exactly what ``benchmarks/make_table.py`` renders from the library and
the saved measurements (so a change to a formula or a config without regenerating fails), and,
independently of the script's own formatting code, the computed tables' cells are re-derived
here from ``minilm.counting`` / ``minilm.memory`` / ``minilm.flops``. Measured numbers are not
recomputed (they depend on the machine); only the estimates printed beside them are.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest

from minilm.config import load_config
from minilm.counting import count_parameters, format_count
from minilm.flops import compute_optimal, flops_per_token, tokens_per_second_at
from minilm.memory import GB, estimate_training_memory, trainer_step_memory

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"


@pytest.fixture(scope="module")
def make_table():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_table"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text()


def shipped(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(ROOT / "configs" / "training" / f"{name}_model.json")


def section(page: str, title: str) -> str:
    start = page.index(f"## {title}\n")
    end = page.find("\n## ", start + 1)
    return page[start : end if end != -1 else None]


def rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell's config name (`tiny` ...)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)` \|(.*)\|$", line)
        if m:
            out[m.group(1)] = [c.strip().strip("*") for c in m.group(2).split("|")]
    return out


def test_page_is_what_the_script_renders(make_table, page):
    assert page == make_table.render(), "docs/benchmarks.md is stale: run python benchmarks/make_table.py --no-measure"


def test_computed_part_does_not_depend_on_measurements(make_table, page):
    assert make_table.computed_section(page) == make_table.render_computed()
    assert make_table.computed_section(make_table.render([])) == make_table.render_computed()


def test_every_shipped_config_is_in_every_table(page):
    names = {p.stem.removesuffix("_model") for p in (ROOT / "configs" / "training").glob("*_model.json")}
    for title in ("Size and compute", "Training memory per GPU", "Time to the compute-optimal token count"):
        assert set(rows(section(page, title))) == names, title


def test_parameter_and_compute_columns(page):
    for name, cells in rows(section(page, "Size and compute")).items():
        cfg = shipped(name)
        pc = count_parameters(cfg)
        assert cells[0] == f"{pc.total:,}"
        assert cells[1] == f"{pc.non_embedding:,}"
        assert float(cells[2].rstrip("M").replace(",", "")) == pytest.approx(flops_per_token(cfg) / 1e6, abs=0.05)
        assert cells[3] == f"{cfg.tokens_per_step:,}"
        assert float(cells[4].rstrip("M").replace(",", "")) == pytest.approx(20 * pc.total / 1e6, abs=0.05)
        assert cells[5] == f"{compute_optimal(cfg).optimizer_steps:,}"


def test_memory_columns(page):
    settings = [(p, ck) for p in ("fp32", "bf16", "fp16") for ck in (False, True)]
    for name, cells in rows(section(page, "Training memory per GPU")).items():
        cfg = shipped(name)
        for (precision, ckpt), cell in zip(settings, cells[1:], strict=True):
            c = cfg.replace(bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=ckpt)
            assert float(cell) == pytest.approx(trainer_step_memory(c).peak_bytes / GB, abs=0.005), (
                name,
                precision,
                ckpt,
            )


def test_memory_table_bolds_the_shipped_setting(page):
    text = section(page, "Training memory per GPU")
    for name in ("tiny", "small", "base", "large"):
        cfg = shipped(name)
        est = trainer_step_memory(cfg).peak_bytes / GB
        line = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"**{est:.2f}**" in line


def test_time_columns(make_table, page):
    for name, cells in rows(section(page, "Time to the compute-optimal token count")).items():
        cfg = shipped(name)
        assert cells[0] == str(cfg.world_size)
        for gpu, cell in zip(make_table.GPUS, cells[2:], strict=True):
            precision = "fp16" if (cfg.bf16 and gpu == "T4") else None  # the T4 has no bf16
            c = cfg.replace(bf16=False, fp16=True) if precision else cfg
            tps = tokens_per_second_at(c, gpu, 0.40, n_devices=cfg.world_size)
            assert f"({format_count(tps)} tok/s)" in cell, (name, gpu)


def test_measured_estimates_are_current(make_table):
    """The estimate printed beside each saved measurement is today's estimate for that run."""
    for record in make_table.load_results():
        for r in record["results"]:
            cfg = shipped(r["config"]).replace(**r["overrides"])
            c = cfg.replace(bf16=r["precision"] == "bf16", fp16=r["precision"] == "fp16")
            device_type = "cpu" if record["device"] == "cpu" else "cuda"
            assert (
                make_table.derived(record, r)["estimated"]
                == estimate_training_memory(c, device_type=device_type).peak_bytes
            )


def test_gpu_records_render_with_datasheet_mfu_and_allocator_numbers(make_table):
    """The GPU path cannot run here; its rendering can: a saved H100 record shows MFU against the datasheet."""
    record = {
        "machine": {
            "python": "3.11",
            "torch": "2.x",
            "date": "2026-01-01",
            "os": "Linux",
            "cpu": "x",
            "cpu_count": 16,
            "torch_threads": 16,
            "device": "NVIDIA H100 80GB HBM3",
            "device_memory_gib": 79.1,
            "cuda": "12.4",
        },
        "device": "cuda",
        "results": [
            {
                "label": "small, as shipped",
                "config": "small",
                "overrides": {},
                "command": "python train.py --config configs/training/small_model.json --max_steps 12",
                "precision": "bf16",
                "timed_steps": 3,
                "tokens_per_s": [500_000.0, 510_000.0, 490_000.0],
                "matmul_peak_flops": 700e12,
                "peak_bytes_measured": 6 * 2**30,
                "memory_method": "torch.cuda.max_memory_allocated",
                "trainer_max_memory_allocated": 6 * 2**30,
                "max_memory_reserved": 7 * 2**30,
            }
        ],
    }
    text = make_table.render_measured(record)
    cfg = shipped("small")
    expected_mfu = 500_000.0 * flops_per_token(cfg) / 989.4e12
    assert f"{expected_mfu:.1%} of H100 SXM datasheet" in text
    assert "7.000 GiB" in text  # max_memory_reserved
    page = make_table.render([record])
    assert "No GPU measurement is saved yet" not in page
    assert make_table.computed_section(page) == make_table.render_computed()


def test_cpu_records_say_whether_bf16_was_native(make_table):
    """A CPU's bf16 rows mean bf16 only where it is native: the file name and heading say which CPU it was."""
    base = {"cpu": "AMD EPYC", "cpu_count": 2, "device": "cpu"}
    native, emulated = {**base, "cpu_native_bf16": True}, {**base, "cpu_native_bf16": False}
    assert make_table.machine_slug(native) == "cpu-amd-epyc-2-cores-bf16"
    assert make_table.machine_slug(emulated) == "cpu-amd-epyc-2-cores"  # two CPUs, two records
    machine = {"python": "3.11", "torch": "2.x", "date": "2026-01-01", "os": "Linux", "torch_threads": 2}
    for info, words in ((native, "native bf16"), (emulated, "no native bf16 (bf16 runs fp32)")):
        text = make_table.render_measured({"machine": {**machine, **info}, "device": "cpu", "results": []})
        assert text.splitlines()[0].endswith(words)


def test_throughput_summary_has_one_row_per_cpu_kind_and_config(make_table):
    """The per-CPU-kind table reads the ratios from the records: fp32 and minilm's default against each peer."""
    ratios = {
        "minilm fp32 / HF fp32": 1.02,
        "minilm fp32 / nanoGPT fp32": 1.19,
        "minilm default (bf16 compiled) / HF default (fp32)": 2.56,
        "minilm default (bf16 compiled) / nanoGPT default (fp32)": 2.97,
    }
    record = {
        "machine": {"cpu": "Xeon", "cpu_kind": "Xeon, native bf16 (AMX)"},
        "results": {
            "small": {"batch": 4, "seq": 256, "ratios": ratios, "default": {"precision": "bf16", "compile": True}},
            "tiny": {"batch": 32, "seq": 128, "ratios": {"minilm fp32 / HF fp32": 1.01}},
        },
    }
    lines = make_table.render_throughput_summary([record]).splitlines()
    table = [line for line in lines if line.startswith("| Xeon")]
    assert table == [
        "| Xeon, native bf16 (AMX) | small (4 × 256) | 1.19× | 1.02× | bf16 compiled | 2.97× | 2.56× |",
        "| Xeon, native bf16 (AMX) | tiny (32 × 128) | – | 1.01× | fp32 | – | – |",
    ]
    assert make_table.render_throughput_summary([]) == ""
