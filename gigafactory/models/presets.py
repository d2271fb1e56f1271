"""Named model presets: Grok-1 as released, Grok-2-style, a Mixtral-compatible variant, and CPU-sized ones."""

from __future__ import annotations

import dataclasses
import math

from gigafactory.models.config import ConfigError, ModelConfig

GROK1_ATTN_SCALE = 0.08838834764831845  # 1/sqrt(128), run.py attn_output_multiplier
GROK1_EMBED_MULT = 78.38367176906169  # sqrt(6144)
GROK1_OUTPUT_MULT = 0.5773502691896257  # 1/sqrt(3)

PRESETS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes; the embedded default of `gigafactory train`.
    "grok-tiny": ModelConfig(),
    # Between tiny and grok-1: ~1B total parameters, fits one GPU for real experiments.
    "grok-1b-moe": ModelConfig(
        name="grok-1b-moe", vocab_size=32768, d_model=1024, n_layers=16, n_heads=8, n_kv_heads=2,
        max_seq_len=4096, moe_ffn_dim=2048, embedding_multiplier=32.0,
    ),
    # ~20B total: a multi-GPU research size with the Grok-1 layer shape.
    "grok-20b-moe": ModelConfig(
        name="grok-20b-moe", vocab_size=131072, d_model=3072, n_layers=32, n_heads=24, n_kv_heads=8,
        head_dim=128, max_seq_len=8192, moe_ffn_dim=8192, embedding_multiplier=math.sqrt(3072),
    ),
    # xAI's released Grok-1 (github.com/xai-org/grok-1 run.py / model.py).
    "grok-1": ModelConfig(
        name="grok-1", vocab_size=131072, d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, head_dim=128,
        max_seq_len=8192, n_experts=8, top_k=2, moe_ffn_dim=32768, attn_scale=GROK1_ATTN_SCALE,
        attn_softcap=30.0, embedding_multiplier=GROK1_EMBED_MULT, output_multiplier=GROK1_OUTPUT_MULT,
    ),
    # Grok-2 ("Grok 2.5") as its public config describes it: a dense FFN beside the experts, an untied head,
    # router and final-logit softcaps. Its long-context RoPE scaling is not modelled (plain rope_theta).
    "grok-2": ModelConfig(
        name="grok-2", vocab_size=131072, d_model=8192, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128,
        max_seq_len=131072, n_experts=8, top_k=2, moe_ffn_dim=16384, dense_ffn_dim=32768,
        rope_theta=208533496.0, attn_softcap=30.0, router_softcap=30.0, final_logit_softcap=50.0,
        embedding_multiplier=math.sqrt(8192), output_multiplier=0.5, tie_embeddings=False,
    ),
    # Standard pre-norm SiLU MoE with none of Grok's caps or multipliers: loads in transformers' Mixtral.
    "mixtral-tiny": ModelConfig(
        name="mixtral-tiny", vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
        moe_ffn_dim=512, activation="silu", norm_placement="pre", rope_theta=1e6, attn_softcap=0.0,
        embedding_multiplier=1.0, output_multiplier=1.0, tie_embeddings=False, router_renormalize=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
