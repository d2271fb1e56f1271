"""Models: the Grok family, its config and presets, and parameter/FLOP counts.

The torch model (`GrokModel`, `KVCache`) is imported on first use, so `gigafactory plan` and `simulate`, which
need only configs, presets and FLOP counts, never pay torch's multi-second import.
"""

from gigafactory.models.config import ConfigError, ModelConfig
from gigafactory.models.flops import count_params, training_flops_per_token
from gigafactory.models.presets import PRESETS, get_preset

_LAZY = {"GrokModel": "gigafactory.models.grok", "KVCache": "gigafactory.models.grok"}

__all__ = ["ConfigError", "ModelConfig", "GrokModel", "KVCache", "PRESETS", "get_preset", "count_params", "training_flops_per_token"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
