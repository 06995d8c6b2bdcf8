"""The command line: the design's commands, overrides and their errors, train -> sample, SIGINT, resume."""

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minilm import Config
from minilm.checkpoint import list_checkpoints, load_checkpoint
from minilm.cli import main, resolve_train_args

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# The design's commands (configs/training/README.md), as a user types them in the repository root.
DESIGN_COMMANDS = {
    "python train.py --config configs/training/small_model.json": {"d_model": 512, "world_size": 1},
    "python train.py --config configs/training/base_model.json": {"d_model": 768},
    "torchrun --nproc_per_node=4 train.py --config configs/training/large_model.json": {"world_size": 4},
    "python train.py --config configs/training/base_model.json --learning_rate 0.00005": {"learning_rate": 5e-5},
    "python train.py --config configs/training/small_model.json --batch_size 32": {"batch_size": 32},
    "python train.py --config configs/training/base_model.json --resume_from_checkpoint outputs/checkpoint-10000": {
        "d_model": 768
    },
}


def script_args(command: str) -> list[str]:
    """What train.py receives: everything after 'train.py'."""
    words = shlex.split(command)
    return words[words.index("train.py") + 1 :]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch, tmp_path_factory):
    monkeypatch.chdir(ROOT)  # the design's relative config paths
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def micro(tmp_path_factory, micro_config):
    """A micro config saved as JSON: (path, config)."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = micro_config(tmp / "out", max_steps=4, warmup_steps=1, eval_steps=2, save_steps=2)
    path = tmp / "micro.json"
    cfg.save(path)
    return path, cfg


@pytest.mark.parametrize("command", list(DESIGN_COMMANDS))
def test_design_commands_parse(command, capsys):
    cfg, ns = resolve_train_args(script_args(command))
    for field, value in DESIGN_COMMANDS[command].items():
        assert getattr(cfg, field) == value
    if "resume_from_checkpoint" in command:
        assert ns.resume_from_checkpoint == "outputs/checkpoint-10000"
    assert main([*script_args(command), "--dry_run"]) == 0
    assert "non-embedding" in capsys.readouterr().out


def test_every_field_is_an_override():
    cfg, _ = resolve_train_args(
        ["--config", "configs/training/tiny_model.json", "--fp16", "true", "--d_ff", "null", "--dropout", "0.1"]
    )
    assert cfg.fp16 is True and cfg.d_ff is None and cfg.dropout == 0.1


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--learning_rate", "abc", "argument --learning_rate: invalid float value: 'abc'"),
        ("--learning_rate", "5", "field 'learning_rate' must be a number > 0.0 and <= 1.0, got 5.0"),
        ("--n_heads", "7", "field 'n_heads' must divide d_model"),
        ("--batch_size", "0", "field 'batch_size' must be an integer >= 1, got 0"),
        ("--tokenizer", "word", "field 'tokenizer' must be one of 'char', 'bpe'"),
        ("--learning_rat", "0.1", "unknown argument '--learning_rat'; did you mean --learning_rate?"),
    ],
)
def test_bad_override_exits_2_naming_the_field(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", "configs/training/tiny_model.json", flag, value])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_config_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--batch_size", "4"])
    assert exc.value.code == 2 and "--config is required" in capsys.readouterr().err


def test_world_size_without_torchrun_is_a_clear_error(micro, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", str(micro[0]), "--world_size", "2"]) == 2
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().err


def test_train_then_sample_then_resume(micro, capsys):
    path, cfg = micro
    assert main(["train", "--config", str(path), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "unigram baseline" in out and "sample:" in out
    ckpt = Path(cfg.output_dir) / "checkpoint-4"
    assert list_checkpoints(cfg.output_dir)[-1] == ckpt

    assert main(["sample", "--checkpoint", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= len("ROMEO:") + 20
    # An output folder means its newest checkpoint; the same seed gives the same text.
    assert main(["sample", "--checkpoint", cfg.output_dir, "--prompt", "ROMEO:", "--max_new_tokens", "30"]) == 0
    assert capsys.readouterr().out == text

    # Resume without --config: the checkpoint's config, with overrides on top.
    assert main(["--resume_from_checkpoint", str(ckpt), "--max_steps", "6", "--no_progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(Path(cfg.output_dir) / "checkpoint-6").config.max_steps == 6


def test_sample_errors(micro, capsys, tmp_path):
    assert main(["sample", "--checkpoint", str(tmp_path / "checkpoint-7")]) == 1
    assert "checkpoint-7: no such checkpoint" in capsys.readouterr().err
    path, cfg = micro
    main(["train", "--config", str(path), "--no_progress", "--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "日本"])
    assert exc.value.code == 2 and "--prompt: character '日'" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint_and_the_run_resumes(micro, tmp_path):
    """`python train.py ...` interrupted with Ctrl-C (SIGINT) saves, exits 130, and resumes."""
    path, _ = micro
    out = tmp_path / "run"
    args = ["--config", str(path), "--output_dir", str(out), "--max_steps", "100000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", *args, "--eval_steps", "5", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until it is training
            lines.append(line)
            if "val loss" in line:
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stdout.readlines()
    finally:
        proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode == 130, output
    assert "SIGINT: saving a checkpoint" in output and "interrupted: received SIGINT" in output
    saved = list_checkpoints(out)[-1]  # the one saved on SIGINT (periodic ones come every 2 steps)
    step = load_checkpoint(saved).step
    assert step >= 5 and f"checkpoint: {saved}" in output
    assert main(["--resume_from_checkpoint", "latest", *args, "--max_steps", str(step + 2), "--no_progress"]) == 0
    assert list_checkpoints(out)[-1].name == f"checkpoint-{step + 2}"


def test_missing_resume_checkpoint_is_a_clear_error(micro, capsys, tmp_path):
    assert main(["--resume_from_checkpoint", str(tmp_path / "checkpoint-10000")]) == 1
    assert "checkpoint-10000: no such checkpoint" in capsys.readouterr().err
    assert main(["--config", str(micro[0]), "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")]) == 1
    assert "checkpoint-3: no such checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"]], ids=["train", "sample"])
def test_help_lists_every_field(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    assert exc.value.code == 0
    if argv == ["--help"]:
        assert all(f"--{name}" in out for name in Config.__dataclass_fields__)
        assert "off by more than 10% warns" in out  # argparse %-formats help: the '%' must survive
    else:
        assert "--max_new_tokens" in out and "--top_k" in out


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--seed", "1"], "trained with seed 1337 but this run has seed 1; resume with the same seed (--seed 1337)"),
        (["--batch_size", "3"], "use a batch_size x world_size that divides 8, such as the checkpoint's 4"),
    ],
    ids=["seed", "batch_size"],
)
def test_resume_with_an_incompatible_data_order_is_a_clear_error(micro, capsys, tmp_path, flags, expected):
    """Another seed reorders the data; a batch that does not divide the sequences consumed cannot continue the
    stream. Both exit 1 with a message naming the field, not a traceback."""
    path, _ = micro
    out = tmp_path / "run"
    assert main(["--config", str(path), "--output_dir", str(out), "--max_steps", "2", "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["--resume_from_checkpoint", str(out / "checkpoint-2"), *flags, "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'checkpoint-2'}: ") and expected in err


def test_output_dir_that_cannot_be_created_is_a_clear_error(micro, capsys, tmp_path):
    path, _ = micro
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    assert main(["--config", str(path), "--output_dir", str(out), "--max_steps", "2", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: ") and "choose an --output_dir you can create and write" in err


def test_sample_with_a_bad_device_is_a_usage_error(micro, capsys):
    """`minilm sample --device gpu`: the field's allowed forms, exit 2, no torch traceback."""
    path, cfg = micro
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", cfg.output_dir, "--device", "gpu"])
    assert e.value.code == 2
    assert "field 'device' must be one of 'auto', 'cpu', 'cuda'" in capsys.readouterr().err
