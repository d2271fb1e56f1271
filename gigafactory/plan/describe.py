"""Describe any published model for the planner in a TOML `[model]` section.

The trainer's keys (models/config.py: d_model, n_layers, n_heads, n_kv_heads, head_dim, n_experts, top_k,
moe_ffn_dim, vocab_size, ...) describe GQA/MQA (n_kv_heads < n_heads, = 1) and gated MLPs. The planner also reads
architecture keys the trainer does not build, so e.g. DeepSeek-V3 or a GPT with a plain MLP can be priced:

  attention = "mla"     with q_lora_rank, kv_lora_rank, rope_head_dim, v_head_dim (head_dim = the no-rope part)
  mlp = "plain"         2-matrix MLP (default "gated")
  n_shared_experts, n_dense_layers, dense_layer_ffn_dim, capacity_factor, node_limit

A file using them is a planning description only: `gigafactory train` rejects the extra keys.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.plan.workload import Workload, from_model_config

PLANNER_KEYS = ("attention", "q_lora_rank", "kv_lora_rank", "rope_head_dim", "v_head_dim", "mlp", "n_shared_experts",
                "n_dense_layers", "dense_layer_ffn_dim", "capacity_factor", "node_limit")


def split_model_table(raw: dict) -> tuple[dict, dict]:
    """(the TOML with the planner-only [model] keys removed, those keys)."""
    model = raw.get("model", {})
    if not isinstance(model, dict):
        return raw, {}  # the trainer's loader says "[model] must be a table"
    model = dict(model)
    extra = {k: model.pop(k) for k in PLANNER_KEYS if k in model}
    return {**raw, "model": model}, extra


def apply(w: Workload, extra: dict, where: str) -> Workload:
    """The workload with the planner-only keys applied; its parameter count recomputed from the shapes."""
    if not extra:
        return w
    values = dict(extra)
    mlp = values.pop("mlp", "gated")
    if mlp not in ("gated", "plain"):
        raise UserError(f"{where}: [model] mlp = {mlp!r} must be 'gated' or 'plain'")
    if values.get("attention", "gqa") not in ("gqa", "mla"):
        raise UserError(f"{where}: [model] attention = {values['attention']!r} must be 'gqa' or 'mla'")
    for key, value in values.items():
        if key == "attention":
            continue
        whole = key != "capacity_factor"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not 0 <= value < 1e12:
            kind = "whole number" if whole else "number"
            raise UserError(f"{where}: [model] {key} = {value!r} must be a {kind} in 0..1e12")
    if values.get("attention") == "mla" and not values.get("kv_lora_rank"):
        raise UserError(f"{where}: [model] attention = 'mla' needs kv_lora_rank > 0")
    if values.get("n_dense_layers", 0) > w.n_layers:
        raise UserError(f"{where}: [model] n_dense_layers = {values['n_dense_layers']} exceeds n_layers = {w.n_layers}")
    ints = {k: int(v) for k, v in values.items() if k not in ("attention", "capacity_factor")}
    out = dataclasses.replace(w, gated=mlp == "gated", **ints,
                              **({"attention": values["attention"]} if "attention" in values else {}),
                              **({"capacity_factor": float(values["capacity_factor"])} if "capacity_factor" in values else {}))
    return dataclasses.replace(out, params_total=int(out.shape_params()))


def read_model_toml(path: str):
    """(the trainer's config, the planner's workload, the whole TOML) for a --model file, read once: the trainer's
    keys build the config, the planner-only [model] keys are applied on top."""
    from gigafactory.config.loader import build_config

    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--model {path!r} is not valid TOML ({err}); fix the syntax") from None
    trainer_part, extra = split_model_table(raw)
    cfg = build_config(trainer_part, {})
    return cfg, apply(from_model_config(cfg.model), extra, path), raw
