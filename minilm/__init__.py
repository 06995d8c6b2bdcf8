"""minilm: build, size and train GPT-style language models, from scratch, to learn how."""

from typing import TYPE_CHECKING

from minilm.config import Config, ConfigError, ParameterEstimateWarning, load_config

if TYPE_CHECKING:
    from minilm.model import GPT
    from minilm.report import TrainResult
    from minilm.trainer import Trainer

__all__ = ["GPT", "Config", "ConfigError", "ParameterEstimateWarning", "TrainResult", "Trainer", "load_config"]
__version__ = "0.1.0"

# The model and the trainer import torch (seconds); `import minilm.config` should not pay for them.
_LAZY = {"GPT": "minilm.model", "Trainer": "minilm.trainer", "TrainResult": "minilm.report"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minilm' has no attribute {name!r}")
