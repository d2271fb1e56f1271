"""vLLM plugin: serves Gigafactory's hf-grok1 and sglang-grok exports with Grok-1's exact math (docs/interop.md).

vLLM retired its Grok model after v0.24, and its Grok code hard-coded math Grok-1 does differently (a router cap of
30, the erf GELU). vLLM calls `register` in each of its processes through the `vllm.general_plugins` entry point
(pyproject.toml). Nothing here imports vLLM at import time: `model.py`, which does, is named as a string and loaded
by vLLM only when it builds the model, so importing gigafactory never needs vLLM.
"""

from __future__ import annotations

# The architectures our exports write into config.json (interop/layouts.py): hf-grok1 uses the hpcai-tech name,
# sglang-grok SGLang's. One class serves both; it reads the tensor names from the config's "gigafactory" block.
ARCHITECTURES = ("Grok1ModelForCausalLM", "Grok1ForCausalLM")
MODEL_CLASS = "gigafactory.interop.vllm_grok.model:GigafactoryGrokForVLLM"
MODEL_TYPE = "gigafactory-grok"


def register() -> None:
    """Register the model for both architectures and our config class for model_type "gigafactory-grok".

    The config class is registered with transformers so that vLLM reads config.json without --trust-remote-code
    (the export's auto_map points at code that this package already has)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from gigafactory.interop.hf_code.configuration_gigafactory_grok import GigafactoryGrokConfig

    AutoConfig.register(MODEL_TYPE, GigafactoryGrokConfig, exist_ok=True)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)
