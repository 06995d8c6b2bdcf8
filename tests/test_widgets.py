"""The config editor, driven headless: set values, read the readouts, save, load back."""

import json
from pathlib import Path

import pytest

from minilm.config import FIELDS, Config, ConfigError, field_type, load_config
from minilm.counting import count_parameters
from minilm.widgets import DERIVED, ConfigEditor

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "training" / "small_model.json"


@pytest.fixture
def editor(tmp_path):
    return ConfigEditor(SMALL, save_dir=tmp_path)


def test_starts_from_a_file_with_its_true_count(editor):
    assert editor.valid and editor.error is None
    assert editor.total_parameters == 33_936_384
    assert editor.config.estimated_parameters == 33_936_384
    assert "33,936,384" in editor.readout()


def test_design_file_with_a_wrong_label_is_corrected_not_rejected(tmp_path):
    ed = ConfigEditor(ROOT / "configs" / "design_original" / "small_model.json", save_dir=tmp_path)
    assert ed.valid and ed.config.estimated_parameters == 33_936_384  # not the file's "124M"


def test_set_updates_the_readouts(editor):
    editor.set(d_model=768, n_heads=12, n_layers=12, vocab_size=50257, d_ff=3072)
    cfg = editor.config
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers) == (768, 12, 12)
    assert editor.total_parameters == count_parameters(cfg).total == 124_439_808  # GPT-2 small
    assert editor.parameters.non_embedding == count_parameters(cfg).non_embedding
    assert editor.get("estimated_parameters") == 124_439_808


def test_memory_readout_follows_the_library(editor):
    from minilm.memory import estimate_training_memory, trainer_step_memory

    editor.set(batch_size=4, gradient_checkpointing=True)
    # The readout predicts minilm's trainer: its chunked loss, not the full logits of a plain loop.
    assert editor.memory.peak_bytes == trainer_step_memory(editor.config, device_type="cuda").peak_bytes
    assert editor.memory.peak_bytes < estimate_training_memory(editor.config, device_type="cuda").peak_bytes
    assert "GiB" in editor.readout()


def test_flops_readout_follows_the_library(editor):
    from minilm.flops import flops_per_token

    editor.set(n_layers=4)
    assert editor.flops_per_token == flops_per_token(editor.config)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"n_heads": 7}, "n_heads"),
        ({"fp16": True, "bf16": True}, "bf16"),
        ({"max_steps": 10, "warmup_steps": 100}, "warmup_steps"),
        ({"dropout": 1.5}, "dropout"),
        ({"activation": "relu"}, "activation"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_invalid_combination_shows_the_error_instead_of_raising(editor, changes, field):
    editor.set(**changes)
    assert not editor.valid and editor.config is None
    assert f"'{field}'" in editor.error
    assert editor.total_parameters is None and editor.memory is None and editor.flops_per_token is None
    assert editor.readout().startswith("invalid config:")
    with pytest.raises(ConfigError):
        editor.save("broken")
    assert not list(editor.save_dir.glob("*.json"))


def test_fixing_the_error_makes_it_valid_again(editor):
    editor.set(n_heads=7)
    assert not editor.valid
    editor.set(n_heads=16)
    assert editor.valid and editor.error is None


def test_unknown_field_raises(editor):
    with pytest.raises(KeyError):
        editor.set(d_modle=512)


def test_saved_file_loads_back_equal(editor, recwarn):
    editor.set(d_model=384, n_heads=6, n_layers=6, d_ff=None, bf16=False, learning_rate=1e-3, description="mine")
    path = editor.save("my_model")
    assert path == editor.save_dir / "my_model.json"
    loaded = load_config(path)
    assert loaded == editor.config
    assert loaded.d_ff is None and loaded.estimated_parameters == count_parameters(loaded).total
    assert not [w for w in recwarn if "estimated_parameters" in str(w.message)]  # label is right
    assert set(json.loads(path.read_text())) == set(FIELDS)


def test_save_refuses_to_overwrite_and_bad_names(editor):
    editor.save("a")
    with pytest.raises(FileExistsError):
        editor.save("a")
    editor.set(n_layers=2)
    assert load_config(editor.save("a", overwrite=True)).n_layers == 2
    with pytest.raises(ValueError):
        editor.save("no spaces!")
    sub = editor.save_dir / "sub" / "b.json"
    assert editor.save(sub) == sub and sub.exists()


def test_default_editor_uses_config_defaults(tmp_path):
    ed = ConfigEditor(save_dir=tmp_path)
    assert ed.config == Config().replace(estimated_parameters=count_parameters(Config()).total)


# --- the ipywidgets form, still headless ------------------------------------------------
widgets = pytest.importorskip("ipywidgets")


def test_form_has_a_control_per_field_with_limits_from_metadata(editor):
    controls = editor.controls
    assert set(controls) == set(FIELDS)
    for name, f in FIELDS.items():
        m = f.metadata
        c = controls[name]
        if "widget_max" in m:
            slider = editor._ui.sliders[name]
            assert isinstance(slider, widgets.IntSlider) and slider.max >= m["widget_max"]
            assert slider.min == m.get("minimum", 0) and not slider.readout  # a typed readout would clamp
        if field_type(name) in (int, float) and name not in DERIVED:
            # unbounded number boxes: an out-of-range value reaches the config's validation unchanged
            assert isinstance(c, (widgets.IntText, widgets.FloatText)), name
        if "choices" in m:
            assert isinstance(c, widgets.Dropdown) and tuple(c.options) == tuple(m["choices"])
        if isinstance(f.default, bool):
            assert isinstance(c, widgets.Checkbox)
    assert controls["estimated_parameters"].disabled


def test_moving_a_control_updates_the_editor_and_the_readouts(editor):
    editor.controls["n_layers"].value = 12
    assert editor.get("n_layers") == 12
    assert editor.controls["estimated_parameters"].value == str(editor.total_parameters)
    editor.controls["n_heads"].value = 7
    assert not editor.valid and "n_heads" in editor._ui.error.value
    editor.controls["n_heads"].value = 8
    assert editor.valid and "valid config" in editor._ui.error.value


def test_programmatic_set_shows_in_the_controls(editor):
    editor.widget  # noqa: B018 -- build the form
    editor.set(n_layers=20, d_ff=None, max_steps=5_000_000, activation="gelu_tanh")
    c = editor.controls
    assert c["n_layers"].value == 20 and c["activation"].value == "gelu_tanh"
    assert c["max_steps"].value == 5_000_000 and editor._ui.sliders["max_steps"].value == 5_000_000
    assert editor._ui.sliders["max_steps"].max >= 5_000_000  # beyond widget_max: the slider grows
    assert editor._ui._auto["d_ff"].value and c["d_ff"].disabled and editor._ui.sliders["d_ff"].disabled
    editor._ui._auto["d_ff"].value = False  # untick "auto": the box's value becomes d_ff
    assert editor.get("d_ff") == c["d_ff"].value


@pytest.mark.parametrize(
    "name, typed",
    [
        ("dropout", 0.95),  # above its maximum (0.9)
        ("learning_rate", 2.0),  # above its maximum (1.0)
        ("weight_decay", -0.1),  # below its minimum
        ("n_layers", 0),  # a slider field: typed into its number box
        ("seed", -1),  # an int without a slider
    ],
)
def test_typed_out_of_range_value_is_kept_and_reported_not_clamped(editor, name, typed):
    """ConfigEditor.set keeps invalid values and reports them; the form's boxes must not clamp them first."""
    editor.controls[name].value = typed
    assert editor.controls[name].value == typed and editor.get(name) == typed
    assert not editor.valid and f"'{name}'" in editor.error
    assert name in editor._ui.error.value and "invalid" in editor._ui.error.value


def test_typed_value_beyond_the_slider_is_valid_and_kept(editor):
    editor.controls["max_steps"].value = 2_000_000  # above widget_max (1,000,000), allowed by the config
    assert editor.valid and editor.config.max_steps == 2_000_000
    assert editor._ui.sliders["max_steps"].max >= 2_000_000  # the slider grows to show it


def test_dragging_a_slider_sets_the_field_and_its_box(editor):
    editor.widget  # noqa: B018 -- build the form
    editor._ui.sliders["n_layers"].value = 12
    assert editor.get("n_layers") == 12 and editor.controls["n_layers"].value == 12


def test_save_button_reports_errors_and_success(editor):
    ui = editor.widget and editor._ui
    editor.set(n_heads=7)
    ui.save_button.click()
    assert "invalid" in ui.save_status.value and not list(editor.save_dir.glob("*.json"))
    editor.set(n_heads=8)
    ui.name.value = "from_button"
    ui.save_button.click()
    assert "saved" in ui.save_status.value
    assert load_config(editor.save_dir / "from_button.json") == editor.config


def test_auto_d_ff_box_follows_d_model(editor):
    """With "auto" ticked the d_ff box shows 4 * d_model, not the value it had when the form was built."""
    editor.widget  # noqa: B018 -- build the form
    ui, box = editor._ui, editor.controls["d_ff"]
    ui._auto["d_ff"].value = True  # tick "auto" in the form
    assert editor.get("d_ff") is None and box.value == 4 * 512
    editor.controls["d_model"].value = 768  # typed into the form
    assert editor.config.ff_width == 3072 and box.value == 3072 and ui.sliders["d_ff"].value == 3072
    editor.set(d_model=1024)  # set from code
    assert box.value == 4096 and ui.sliders["d_ff"].max >= 4096
    editor.set(d_model=640, d_ff=1000)  # a fixed d_ff is kept, not overwritten by the auto rule
    assert not ui._auto["d_ff"].value and box.value == 1000
    editor.set(d_ff=None)  # back to auto from code: the box shows the resolved width at once
    assert ui._auto["d_ff"].value and box.value == 2560
