"""A notebook form over any config: edit every field, see what it costs, save it as JSON.

The form is built from the :class:`~minilm.config.Config` dataclass's metadata, so every
field appears with its help text and its limits, and a new field shows up by itself:

* ``bool`` fields -> checkboxes; fields with ``choices`` -> dropdowns;
* ``int`` and ``float`` fields -> number boxes without bounds, so a value out of range
  reaches the validation and is reported, not silently clamped to the nearest limit;
  ints with a ``widget_max`` also get a slider beside the box (from ``minimum`` to
  ``widget_max``); ``d_ff`` (nullable) gets an "auto" box too;
* strings -> text boxes.

After every change the editor rebuilds the config through the same validation as
:func:`~minilm.config.load_config` and updates its readouts: the parameter count
(:mod:`minilm.counting`), the training FLOPs per token (:mod:`minilm.flops`), the peak
training memory and its breakdown as a chart (:mod:`minilm.memory`), or the validation
error, shown and not raised. ``estimated_parameters`` is not edited by hand: the editor
fills in the true count, so a saved file never carries a wrong label.

All logic lives in :class:`ConfigEditor` and runs without a browser (the tests drive it
headless); the ipywidgets form is built only when displayed::

    >>> from minilm.widgets import ConfigEditor
    >>> ed = ConfigEditor("configs/training/small_model.json")
    >>> ed.set(d_model=768, n_heads=12)
    >>> ed.total_parameters, ed.error
    >>> ed.save("my_model")            # -> configs/my_model.json
    >>> ed                             # in a notebook: the form
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from minilm.config import FIELDS, Config, ConfigError, config_from_dict, field_nullable, field_type, load_config
from minilm.counting import ParameterCount, count_parameters, format_count
from minilm.flops import flops_per_token
from minilm.memory import trainer_step_memory

GROUPS = ("model", "data", "training", "system", "meta")
DERIVED = ("estimated_parameters",)  # computed by the editor, not typed in


class ConfigEditor:
    """Edit a config field by field; read its parameter count, FLOPs, memory and errors; save it.

    ``source`` is a :class:`Config`, a path to a JSON config, or None for the defaults.
    ``save_dir`` is where :meth:`save` puts files given by bare name (``configs/``).
    ``memory_device`` is the device type the memory estimate assumes ('cuda' or 'cpu').
    """

    def __init__(
        self,
        source: Config | str | Path | None = None,
        *,
        save_dir: str | Path = "configs",
        memory_device: str = "cuda",
    ):
        if source is None:
            cfg = Config()
        elif isinstance(source, Config):
            cfg = source
        else:
            cfg = load_config(source, check_estimate=False)
        self._values: dict[str, Any] = cfg.to_dict()
        self.save_dir = Path(save_dir)
        self.memory_device = memory_device
        self._ui: _EditorUI | None = None
        self._refresh()

    # ----------------------------------------------------------------------------- editing
    @property
    def values(self) -> dict[str, Any]:
        """The current field values as typed, valid or not (a copy)."""
        return dict(self._values)

    def get(self, name: str) -> Any:
        return self._values[name]

    def set(self, **changes: Any) -> ConfigEditor:
        """Change fields (unknown names raise ``KeyError``); invalid values are kept and reported in :attr:`error`."""
        unknown = [k for k in changes if k not in FIELDS]
        if unknown:
            raise KeyError(f"unknown config field(s): {', '.join(unknown)}")
        changed = [k for k in changes if k not in DERIVED]
        self._values.update({k: changes[k] for k in changed})
        self._refresh()
        if self._ui is not None:
            self._ui.sync(changed)
        return self

    # ---------------------------------------------------------------------------- readouts
    def _refresh(self) -> None:
        values = {k: v for k, v in self._values.items() if k not in DERIVED}
        try:
            cfg = config_from_dict(values, source="editor", check_estimate=False)
        except ConfigError as e:
            self._config, self._error = None, str(e).removeprefix("editor: ")
        else:
            total = count_parameters(cfg).total
            self._config, self._error = cfg.replace(estimated_parameters=total), None
            self._values["estimated_parameters"] = total
        if self._ui is not None:
            self._ui.update_readouts()

    @property
    def config(self) -> Config | None:
        """The edited config (with ``estimated_parameters`` = the true count), or None while invalid."""
        return self._config

    @property
    def valid(self) -> bool:
        return self._config is not None

    @property
    def error(self) -> str | None:
        """The validation error of the current values, naming the field, or None."""
        return self._error

    @property
    def parameters(self) -> ParameterCount | None:
        return count_parameters(self._config) if self._config else None

    @property
    def total_parameters(self) -> int | None:
        return self.parameters.total if self._config else None

    @property
    def flops_per_token(self) -> int | None:
        """Training FLOPs per token (forward + backward) from :mod:`minilm.flops`, or None."""
        if self._config is None:
            return None
        return flops_per_token(self._config)

    @property
    def memory(self):
        """The :class:`minilm.memory.MemoryEstimate` of one step as minilm's trainer runs it
        (chunked loss, :func:`minilm.memory.trainer_step_memory`), or None."""
        if self._config is None:
            return None
        return trainer_step_memory(self._config, device_type=self.memory_device)

    def readout(self) -> str:
        """The readouts as plain text (what the form shows, minus the chart)."""
        if self._config is None:
            return f"invalid config: {self._error}"
        pc = self.parameters
        lines = [
            f"parameters: {pc.total:,} ({format_count(pc.total)}), non-embedding {pc.non_embedding:,}",
        ]
        f = self.flops_per_token
        lines.append(
            f"training FLOPs per token: {f:,} ({format_count(f)})" if f is not None else "FLOPs: minilm.flops missing"
        )
        m = self.memory
        if m is not None:
            lines.append(
                f"peak training memory ({self.memory_device}): {m.peak_gb:.2f} GiB at {m.peak_moment} "
                f"(batch {m.batch_size} x seq {m.seq_len}, {m.precision})"
            )
        else:
            lines.append("memory: minilm.memory missing")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConfigEditor(valid={self.valid})\n{self.readout()}"

    # -------------------------------------------------------------------------------- save
    def path_for(self, name: str | Path) -> Path:
        """Where :meth:`save` writes ``name``: a bare name goes to ``save_dir/<name>.json``."""
        p = Path(name)
        if p.parent == Path("."):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", p.name):
                raise ValueError(f"config name {str(name)!r}: use letters, digits, '_', '-' or '.'")
            p = self.save_dir / p.name
        return p if p.suffix == ".json" else p.with_name(p.name + ".json")

    def save(self, name: str | Path, *, overwrite: bool = False) -> Path:
        """Write the config as JSON; raises :class:`ConfigError` while invalid, ``FileExistsError`` unless
        ``overwrite``. Returns the path written. The file loads back with ``load_config`` to an equal config."""
        if self._config is None:
            raise ConfigError(f"not saved, the config is invalid: {self._error}")
        path = self.path_for(name)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._config.to_dict(), indent=2) + "\n")
        return path

    # ---------------------------------------------------------------------------- the form
    @property
    def widget(self):
        """The ipywidgets form (built on first use; needs ipywidgets and matplotlib)."""
        if self._ui is None:
            self._ui = _EditorUI(self)
        return self._ui.root

    @property
    def controls(self) -> dict[str, Any]:
        """The input widget of every field, by field name (for a number: its box, which holds the value as typed)."""
        self.widget  # noqa: B018 -- builds the form
        return self._ui.controls

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


# ---------------------------------------------------------------------------------------
# The ipywidgets form
# ---------------------------------------------------------------------------------------
def memory_chart_png(estimate, title: str = "") -> bytes:
    """A horizontal stacked bar of what is alive at the estimated peak, as PNG bytes."""
    from matplotlib.figure import Figure

    parts = [(name, n) for name, n in estimate.at_peak().items() if n > 0]
    fig = Figure(figsize=(7.5, 1.9), dpi=90)
    ax = fig.add_subplot()
    left = 0.0
    cmap = [
        "#4c72b0",
        "#dd8452",
        "#55a868",
        "#c44e52",
        "#8172b3",
        "#937860",
        "#da8bc3",
        "#8c8c8c",
        "#ccb974",
        "#64b5cd",
    ]
    gib = 1024**3
    for i, (name, n) in enumerate(parts):
        ax.barh(0, n / gib, left=left, color=cmap[i % len(cmap)], label=name)
        left += n / gib
    ax.set_yticks([])
    ax.set_xlabel("GiB at the estimated peak")
    ax.set_title(title or f"peak {estimate.peak_gb:.2f} GiB at {estimate.peak_moment}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=3, fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.82, bottom=0.55)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


class _EditorUI:
    """The widgets of one :class:`ConfigEditor`; every change goes through ``editor.set``."""

    def __init__(self, editor: ConfigEditor):
        import ipywidgets as w

        self.w = w
        self.editor = editor
        self.controls: dict[str, Any] = {}
        self.sliders: dict[str, Any] = {}  # ints with a widget_max: a slider beside the number box
        self._auto: dict[str, Any] = {}  # nullable ints: the "auto" checkbox
        self._syncing = False
        # Shared: one layout model each, not one per field. A box with a slider is narrower, so rows line up.
        self._control_layout = w.Layout(width="520px")
        self._box_layout = w.Layout(width="300px")
        self._slider_layout = w.Layout(width="220px")
        tabs = []
        for group in GROUPS:
            rows = [self._row(name) for name, f in FIELDS.items() if f.metadata["group"] == group]
            tabs.append(w.VBox(rows))
        self.tabs = w.Tab(children=tabs, titles=GROUPS)
        self.summary = w.HTML()
        self.error = w.HTML()
        self.chart = w.Image(format="png", layout=w.Layout(max_width="680px"))
        self.name = w.Text(value="my_model", description="save as", layout=w.Layout(width="280px"))
        self.overwrite = w.Checkbox(value=False, description="overwrite", indent=False)
        self.save_button = w.Button(description="Save JSON", icon="save", button_style="primary")
        self.save_status = w.HTML()
        self.save_button.on_click(self._on_save)
        save_row = w.HBox([self.name, self.overwrite, self.save_button])
        self.root = w.VBox(
            [
                w.HTML(f"<b>Config editor</b> — saves into <code>{editor.save_dir}/</code>"),
                self.tabs,
                self.error,
                self.summary,
                self.chart,
                save_row,
                self.save_status,
            ]
        )
        self.update_readouts()

    # --- one control per field -----------------------------------------------------------
    def _row(self, name: str):
        w = self.w
        f = FIELDS[name]
        m = f.metadata
        kind = field_type(name)
        value = self.editor.get(name)
        style = {"description_width": "170px"}
        common = dict(description=name, style=style, layout=self._control_layout, tooltip=m["help"])
        lo = m.get("minimum", m.get("exclusive_minimum", None))
        if name in DERIVED:
            control = w.Text(value=str(value), disabled=True, **common)
        elif "choices" in m:
            control = w.Dropdown(options=list(m["choices"]), value=value, **common)
        elif kind is bool:
            control = w.Checkbox(value=bool(value), indent=False, description=name, tooltip=m["help"])
        elif kind is int:
            # Unbounded on purpose (as are the float boxes below): a Bounded*Text or a slider's typed
            # readout clamps an out-of-range number to the nearest limit without a word, so the user
            # would see a valid config that is not what they typed. The config's validation reports it.
            shown = value if value is not None else self._auto_value(name, lo or 0)
            if "widget_max" in m:
                control = w.IntText(value=shown, **{**common, "layout": self._box_layout})
                # For dragging through the usual range. No readout: a number typed there would be
                # clamped to [min, max] by the browser; typing goes to the box.
                slider = w.IntSlider(
                    value=shown,
                    min=lo or 0,
                    max=max(m["widget_max"], shown),
                    readout=False,
                    continuous_update=False,
                    layout=self._slider_layout,
                    tooltip=m["help"],
                )
                slider.observe(lambda ch, n=name: self._on_change(n, ch["new"]), names="value")
                self.sliders[name] = slider
            else:
                control = w.IntText(value=shown, **common)
            if field_nullable(name):
                auto = w.Checkbox(value=value is None, description="auto", indent=False, layout=w.Layout(width="80px"))
                self._set_disabled(name, control, value is None)
                auto.observe(lambda ch, n=name: self._on_auto(n, ch["new"]), names="value")
                self._auto[name] = auto
        elif kind is float:
            control = w.FloatText(value=value, **common)
        else:
            control = w.Text(value=str(value), continuous_update=False, **common)
        self.controls[name] = control
        if name not in DERIVED:
            control.observe(lambda ch, n=name: self._on_change(n, ch["new"]), names="value")
        help_text = w.HTML(f"<span style='color:#666;font-size:90%'>{m['help']}</span>")
        parts = [control]
        if name in self.sliders:
            parts.append(self.sliders[name])
        if name in self._auto:
            parts.append(self._auto[name])
        return w.HBox([*parts, help_text])

    def _auto_value(self, name: str, default: int = 0) -> int:
        """What an "auto" (None) field resolves to, for its greyed-out box: d_ff -> 4 * d_model."""
        d_model = self.editor.get("d_model")
        if name == "d_ff" and isinstance(d_model, int) and not isinstance(d_model, bool):
            return 4 * d_model
        return default

    def _show_auto_values(self) -> None:
        """Keep each ticked "auto" box showing the value it resolves to now (d_ff follows d_model)."""
        self._syncing = True
        try:
            for name, auto in self._auto.items():
                if not auto.value or self.editor.get(name) is not None:
                    continue
                shown = self._auto_value(name, self.controls[name].value)
                self.controls[name].value = shown
                slider = self.sliders.get(name)
                if slider is not None:
                    slider.max = max(slider.max, shown)
                    slider.min = min(slider.min, shown)
                    slider.value = shown
        finally:
            self._syncing = False

    def _set_disabled(self, name: str, control, disabled: bool) -> None:
        control.disabled = disabled
        if name in self.sliders:
            self.sliders[name].disabled = disabled

    # --- events --------------------------------------------------------------------------
    def _on_change(self, name: str, value: Any) -> None:
        if self._syncing:
            return
        if name in self._auto and self._auto[name].value:
            return
        self.editor.set(**{name: value})

    def _on_auto(self, name: str, auto: bool) -> None:
        self._set_disabled(name, self.controls[name], auto)
        if self._syncing:
            return
        self.editor.set(**{name: None if auto else self.controls[name].value})

    def _on_save(self, _button=None) -> None:
        try:
            path = self.editor.save(self.name.value.strip(), overwrite=self.overwrite.value)
        except (ConfigError, FileExistsError, ValueError) as e:
            self.save_status.value = f"<span style='color:#b00'>{_escape(str(e))}</span>"
        else:
            self.save_status.value = f"<span style='color:#070'>saved {_escape(str(path))}</span>"

    # --- editor -> widgets ---------------------------------------------------------------
    def sync(self, names: list[str]) -> None:
        """Show values set programmatically (``editor.set``) in the controls."""
        self._syncing = True
        try:
            for name in list(names) + list(DERIVED):
                value = self.editor.get(name)
                control = self.controls[name]
                if name in self._auto:
                    self._auto[name].value = value is None
                    self._set_disabled(name, control, value is None)
                    if value is None:
                        continue
                if name in DERIVED or field_type(name) is str:
                    value = "" if value is None else str(value)
                control.value = value
                slider = self.sliders.get(name)
                if slider is not None and isinstance(value, int):
                    # Grow the slider's range to the value rather than let the slider clamp it.
                    slider.max = max(slider.max, value)
                    slider.min = min(slider.min, value)
                    slider.value = value
        finally:
            self._syncing = False
        self._show_auto_values()  # a field just set to None ("auto") shows what it resolves to

    def update_readouts(self) -> None:
        ed = self.editor
        self._show_auto_values()
        if ed.error:
            self.error.value = f"<div style='color:#b00'><b>invalid:</b> {_escape(ed.error)}</div>"
        else:
            self.error.value = "<div style='color:#070'>valid config</div>"
        self.summary.value = f"<pre style='line-height:1.3'>{_escape(ed.readout())}</pre>"
        m = ed.memory
        if m is not None:
            self.chart.value = memory_chart_png(m)
            self.chart.layout.display = None
        else:
            self.chart.layout.display = "none"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
