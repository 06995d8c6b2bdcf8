"""minilm: build, size and train GPT-style language models, from scratch, to learn how."""

from minilm.config import Config, ConfigError, ParameterEstimateWarning, load_config
from minilm.model import GPT
from minilm.trainer import Trainer, TrainResult

__all__ = ["GPT", "Config", "ConfigError", "ParameterEstimateWarning", "TrainResult", "Trainer", "load_config"]
__version__ = "0.1.0"
