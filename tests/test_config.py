"""Config loading: every kind of bad input gets one clear message naming the file and field."""

import json
import re
import warnings
from pathlib import Path

import pytest

from minilm.config import (
    FIELDS,
    Config,
    ConfigError,
    ParameterEstimateWarning,
    load_config,
    parse_count,
    parse_overrides,
)
from minilm.counting import count_parameters

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs" / "training").glob("*.json"))
DESIGN = sorted((ROOT / "configs" / "design_original").glob("*.json"))
DESIGN_SHAPES = {  # SEED.md: the design's architectures, which the shipped configs must keep exactly
    "small_model": (16000, 512, 8, 8),
    "base_model": (32000, 768, 12, 12),
    "large_model": (50000, 1024, 16, 24),
}


def write(tmp_path, values, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


def test_shipped_configs_exist_and_load_without_warnings():
    names = {p.stem for p in SHIPPED}
    assert {"tiny_model", "small_model", "base_model", "large_model"} <= names
    for path in SHIPPED:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a wrong estimated_parameters would raise here
            cfg = load_config(path)
        assert cfg.estimated_parameters == count_parameters(cfg).total, path.name
        assert set(json.loads(path.read_text())) == set(FIELDS), f"{path.name} should state every field"


@pytest.mark.parametrize("name", sorted(DESIGN_SHAPES))
def test_shipped_configs_keep_design_architecture(name):
    cfg = load_config(ROOT / "configs" / "training" / f"{name}.json")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers) == DESIGN_SHAPES[name]


@pytest.mark.parametrize("path", DESIGN, ids=lambda p: p.stem)
def test_design_original_configs_warn_with_both_numbers(path):
    with pytest.warns(ParameterEstimateWarning) as record:
        cfg = load_config(path)
    message = str(record[0].message)
    true = count_parameters(cfg).total
    assert f"{cfg.estimated_parameters:,}" in message and f"{true:,}" in message
    assert path.name in message


def test_estimate_within_ten_percent_does_not_warn(tmp_path):
    true = count_parameters(Config(vocab_size=100, d_model=32, n_heads=4, n_layers=2)).total
    path = write(
        tmp_path, dict(vocab_size=100, d_model=32, n_heads=4, n_layers=2, estimated_parameters=int(true * 1.09))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(path)


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, {"d_modle": 64})
    with pytest.raises(ConfigError, match=r"cfg\.json: unknown field 'd_modle'; did you mean 'd_model'\?"):
        load_config(path)


def test_wrong_type_names_field_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'batch_size' must be an integer >= 1, got str '8'"):
        load_config(write(tmp_path, {"batch_size": "8"}))
    with pytest.raises(ConfigError, match=r"field 'fp16' must be true or false, got int 1"):
        load_config(write(tmp_path, {"fp16": 1}))
    with pytest.raises(ConfigError, match=r"field 'n_layers' must be an integer"):
        load_config(write(tmp_path, {"n_layers": True}))


@pytest.mark.parametrize("name", ["vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len", "batch_size"])
def test_non_positive_sizes_rejected(tmp_path, name):
    with pytest.raises(ConfigError, match=rf"cfg\.json: field '{name}' must be an integer >= 1.*got 0"):
        load_config(write(tmp_path, {name: 0}))


def test_choices_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'attention' must be one of 'sdpa', 'manual', got 'flash'"):
        load_config(write(tmp_path, {"attention": "flash"}))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12", "mps"])
def test_device_accepts_what_local_device_resolves(device):
    assert Config(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:01", "cuda:-1", " cpu", "cuda0", "MPS", "metal", ""])
def test_device_rejected_names_the_field_and_the_forms(tmp_path, device):
    # Caught on load (exit 2 from train.py), not later as a raw torch RuntimeError.
    with pytest.raises(ConfigError, match=r"cfg\.json: field 'device' must be one of 'auto', 'cpu', 'cuda'.*'cuda:N'"):
        load_config(write(tmp_path, {"device": device}))
    path = ROOT / "configs" / "training" / "tiny_model.json"
    with pytest.raises(ConfigError, match=rf"field 'device' must be .*, got {re.escape(repr(device))}$"):
        load_config(path, overrides=parse_overrides(["--device", device]))


def test_train_with_a_bad_device_exits_2_naming_the_field(capsys):
    from minilm.cli import resolve_train_args

    with pytest.raises(SystemExit) as exc:  # docs/troubleshooting.md: config errors exit 2, naming the field
        resolve_train_args(["--config", str(ROOT / "configs" / "training" / "tiny_model.json"), "--device", "gpu"])
    assert exc.value.code == 2
    assert "field 'device' must be one of 'auto', 'cpu', 'cuda'" in capsys.readouterr().err


def test_heads_must_divide_d_model(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'n_heads' must divide d_model.*d_model=100.*n_heads=8.*1, 2, 4, 5"):
        load_config(write(tmp_path, {"d_model": 100, "n_heads": 8}))


def test_fp16_and_bf16_exclusive(tmp_path):
    with pytest.raises(ConfigError, match=r"'fp16' and 'bf16' are both true"):
        load_config(write(tmp_path, {"fp16": True, "bf16": True}))


def test_warmup_longer_than_run(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'warmup_steps' \(200\) must be <= max_steps \(100\)"):
        load_config(write(tmp_path, {"warmup_steps": 200, "max_steps": 100}))


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "d_model": 64,\n  "n_heads": 4\n  "n_layers": 2\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json: malformed JSON at line 4, column 3"):
        load_config(path)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.json: config file not found"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"expected a JSON object"):
        load_config(write(tmp_path, [1, 2]))


def test_overrides_parse_typed_and_apply(tmp_path):
    ov = parse_overrides(["--learning_rate", "5e-5", "--batch_size", "32", "--fp16", "true", "--d_ff", "null"])
    assert ov == {"learning_rate": 5e-5, "batch_size": 32, "fp16": True, "d_ff": None}
    assert isinstance(ov["batch_size"], int) and isinstance(ov["learning_rate"], float)
    cfg = load_config(ROOT / "configs" / "training" / "tiny_model.json", overrides={"batch_size": 4})
    assert cfg.batch_size == 4


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--batch_size", "many"], r"field 'batch_size' must be an integer >= 1"),
        (["--fp16", "maybe"], r"field 'fp16' must be true or false"),
        (["--learning_rat", "1e-3"], r"unknown field 'learning_rat'; did you mean 'learning_rate'"),
    ],
)
def test_bad_overrides(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_overrides(argv)


def test_override_validated_like_file(tmp_path):
    path = ROOT / "configs" / "training" / "tiny_model.json"
    with pytest.raises(ConfigError, match=r"field 'batch_size' must be an integer >= 1, got -3"):
        load_config(path, overrides=parse_overrides(["--batch_size", "-3"]))
    with pytest.raises(ConfigError, match=r"override: unknown field 'bacth_size'"):
        load_config(path, overrides={"bacth_size": 3})


def test_parse_count():
    assert parse_count("124M") == 124_000_000
    assert parse_count("1.3B") == 1_300_000_000
    assert parse_count("33,936,384") == 33_936_384
    with pytest.raises(ValueError):
        parse_count("lots")


def test_save_round_trip(tmp_path):
    cfg = Config(vocab_size=100, d_model=32, n_heads=4, n_layers=2, learning_rate=1e-3)
    cfg.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


def test_config_path_finds_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    from minilm.config import config_path, configs_dir

    monkeypatch.chdir(tmp_path)  # a grading tree or Colab: no ../configs here
    expected = configs_dir() / "training" / "tiny_model.json"
    assert expected.is_file()
    for name in ("tiny", "tiny_model", "training/tiny_model.json", "training/tiny_model"):
        assert config_path(name) == expected
    assert config_path("design_original/small_model").name == "small_model.json"
    assert load_config("tiny").d_model == load_config(expected).d_model
    with pytest.raises(ConfigError, match="no such config.*training/tiny_model"):
        config_path("tiny_modle")
    monkeypatch.setenv("MINILM_CONFIGS", str(tmp_path))
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "mine_model.json").write_text("{}")
    assert config_path("mine") == tmp_path / "training" / "mine_model.json"
