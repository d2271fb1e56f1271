"""Models: the Grok family, its config and presets, and parameter/FLOP counts."""

from gigafactory.models.config import ConfigError, ModelConfig
from gigafactory.models.flops import count_params, training_flops_per_token
from gigafactory.models.grok import GrokModel, KVCache
from gigafactory.models.presets import PRESETS, get_preset

__all__ = ["ConfigError", "ModelConfig", "GrokModel", "KVCache", "PRESETS", "get_preset", "count_params", "training_flops_per_token"]
