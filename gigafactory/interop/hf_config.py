"""Reading an exported (or third-party) config.json for `import hf`: every field is honoured or refused, never dropped.

A field Gigafactory does not model but that changes the math (attn_output_multiplier, a sliding window, rope scaling,
quantisation, ...) would make the imported model silently differ from the one the file describes, so it is an error
naming the field. Fields that only matter to training or tooling (initializer_range, transformers_version, ...) are
listed in BENIGN and accepted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gigafactory.config.loader import model_config_from_table
from gigafactory.errors import UserError
from gigafactory.interop.layouts import config_json
from gigafactory.models.config import ConfigError, ModelConfig

# Accepted whatever their value: they do not change the forward pass.
BENIGN = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "attention_dropout", "auto_map", "output_attentions", "output_hidden_states", "return_dict",
    "load_presharded_moe", "load_presharded_attn", "load_presharded_mlp", "load_presharded_embedding", "context_len",
    "num_experts", "num_local_experts", "max_position_embeddings", "tie_word_embeddings", "gigafactory",
})
# Read (honoured) when there is no "gigafactory" block.
_COMMON = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "num_experts_per_tok", "rms_norm_eps", "rope_theta", "rope_parameters", "intermediate_size"}
_READ = {
    "hf-mixtral": _COMMON | {"hidden_act", "sliding_window", "rope_scaling"},
    "hf-grok1": _COMMON | {"attn_logit_softcapping", "max_attn_value", "embedding_multiplier_scale", "output_multiplier_scale",
                           "router_logit_softcapping", "moe_renormalize", "moe_router_renormalize", "attn_output_multiplier",
                           "final_logit_softcapping", "hidden_act", "rope_scaling"},
}
_READ["sglang-grok"] = _READ["hf-grok1"] | {"residual_moe", "moe_intermediate_size", "attn_logit_softcapping_method", "attn_temperature_len"}
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def read_config_json(path: Path) -> dict:
    """config.json as a dict; unreadable, invalid or non-object JSON is one line naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' cannot be read ({getattr(err, 'strerror', None) or err}); pass a directory written by `gigafactory export`") from None
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        "restore the config.json written by `gigafactory export`") from None
    if not isinstance(config, dict):
        raise UserError(f"'{path}' holds a JSON {type(config).__name__}, not an object; restore the config.json written by `gigafactory export`")
    block = config.get("gigafactory", {})
    if not isinstance(block, dict) or not isinstance(block.get("model", {}), dict):
        raise UserError(f"'{path}': the \"gigafactory\" entry must be an object with a \"model\" object; restore it from the export")
    return config


def model_config_from_json(fmt: str, config: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig a config.json describes, with every field honoured or refused (UserError naming it).

    An export's "gigafactory" block is exact; the engine fields beside it must agree with it (an edited field would
    otherwise be ignored). Without the block (a third-party checkpoint) the engine fields are mapped one by one."""
    recorded = config.get("gigafactory", {}).get("model")
    try:
        if recorded:
            cfg = model_config_from_table(recorded)
            _check_agrees(fmt, config, cfg, where)
            return cfg
        _check_fields(fmt, config, where)
        return model_config_from_table(_engine_table(fmt, config))
    except ConfigError as err:
        raise UserError(f"{where}: {err}") from None


# Fields that never change the math (exports before issue 18 said model_type "git" and had no auto_map).
_METADATA = {"torch_dtype", "dtype", "gigafactory", "model_type", "auto_map", "architectures", "transformers_version"}


def _check_agrees(fmt: str, config: dict, cfg: ModelConfig, where: str) -> None:
    expected = config_json(fmt, cfg, _DTYPE_NAMES.get(str(config.get("torch_dtype")), "bf16"))
    for key, value in config.items():
        if key in _METADATA or (key in BENIGN and key not in expected):
            continue
        if fmt == "sglang-grok" and key == "router_logit_softcapping" and value == 30.0 and cfg.router_softcap == 0:
            continue  # exports before issue 18 wrote SGLang's hard-coded cap here, not the model's (the block is exact)
        if key not in expected:
            raise UserError(f"{where}: field {key!r} is not part of the {fmt} layout and Gigafactory cannot honour it; "
                            "remove it, or re-export from the checkpoint")
        if not _same(value, expected[key]):
            raise UserError(f"{where}: {key}={value!r} disagrees with its \"gigafactory\" block ({expected[key]!r}); "
                            "restore the exported value or re-export from the checkpoint")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _check_fields(fmt: str, config: dict, where: str) -> None:
    """Refuse a third-party field that is unknown, or known but with a value Gigafactory's model cannot reproduce."""
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{where}: rope_parameters must be an object like {{\"rope_theta\": 10000.0}}")
    temp = config.get("attn_temperature_len", -1)
    for key in config:
        if key not in BENIGN and key not in _READ[fmt]:
            raise UserError(f"{where}: field {key!r} is not one Gigafactory reads for {fmt}; it may change the model's math, "
                            "so the import stops (remove it if it does not)")
    refusals = [
        ("rope_scaling", config.get("rope_scaling") is None, "rope scaling is not modelled"),
        ("rope_parameters", rope.get("rope_type", "default") == "default" and set(rope) <= {"rope_type", "rope_theta"},
         "only plain rope (rope_type default) is modelled"),
        ("sliding_window", config.get("sliding_window") is None, "sliding-window attention is not modelled"),
        ("attn_output_multiplier", config.get("attn_output_multiplier", 1.0) == 1.0,
         "vLLM scales the attention output by it, hpcai-tech's code the attention logits, so its meaning depends on where "
         "the file came from; import the original release with `gigafactory import grok1`"),
        ("attn_logit_softcapping_method", config.get("attn_logit_softcapping_method", "tanh") == "tanh", "only the tanh cap is modelled"),
        ("attn_temperature_len", isinstance(temp, (int, float)) and not isinstance(temp, bool) and temp <= 0,
         "Grok-2's attention temperature is not modelled"),
    ]
    act = config.get("hidden_act")
    if act is not None:
        allowed = ("silu",) if fmt == "hf-mixtral" else ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh")
        refusals.append(("hidden_act", act in allowed, f"the {fmt} layout runs {' / '.join(allowed)}"))
    for key, ok, why in refusals:
        if not ok:
            raise UserError(f"{where}: {key}={config.get(key)!r} cannot be imported ({why})")


def _engine_table(fmt: str, config: dict) -> dict:
    """A [model] table from a third-party config.json's engine fields (types are checked by the caller)."""
    try:
        rope = config.get("rope_parameters") or {}
        table = dict(
            name=f"imported-{fmt}", vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            head_dim=config.get("head_dim") or 0, max_seq_len=config.get("max_position_embeddings", 8192),
            n_experts=config.get("num_local_experts") or config.get("num_experts", 8), top_k=config.get("num_experts_per_tok", 2),
            norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
            tie_embeddings=config.get("tie_word_embeddings", fmt == "hf-grok1"),
        )
        if fmt == "hf-mixtral":
            table.update(moe_ffn_dim=config["intermediate_size"], activation="silu", norm_placement="pre", attn_softcap=0.0,
                         embedding_multiplier=1.0, output_multiplier=1.0, router_renormalize=True)
            return table
        residual = config.get("residual_moe", False)
        table.update(
            moe_ffn_dim=config.get("moe_intermediate_size") or config["intermediate_size"],
            dense_ffn_dim=config.get("intermediate_size", 0) if residual else 0,
            attn_softcap=config.get("attn_logit_softcapping", config.get("max_attn_value", 30.0)),
            embedding_multiplier=config.get("embedding_multiplier_scale", 78.38367176906169),
            output_multiplier=config.get("output_multiplier_scale", 0.5773502691896257),
            final_logit_softcap=config.get("final_logit_softcapping") or 0.0,
            router_softcap=config.get("router_logit_softcapping") or 0.0,  # absent: Grok-1's own router has no cap
            router_renormalize=config.get("moe_renormalize", config.get("moe_router_renormalize", False)),
        )
        if fmt == "sglang-grok":
            table["tie_embeddings"] = False
        return table
    except KeyError as err:
        raise UserError(f"config.json lacks {err.args[0]!r}, which the {fmt} layout needs; use a complete export") from None
