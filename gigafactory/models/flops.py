"""Parameter counts and FLOPs per token for any ModelConfig, computed from the config alone (meta-safe).

The planner (`gigafactory plan`) and the trainer's MFU both use these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.models.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one model config."""

    total: int  # every parameter, tied embedding counted once
    active: int  # parameters a token touches: everything except the (n_experts - top_k) unused experts
    embedding: int  # input embedding (+ untied output head)
    attention: int  # all layers
    experts: int  # all experts, all layers
    per_expert: int  # one expert FFN of one layer
    dense_ffn: int  # all layers' dense FFNs (Grok-2 style), 0 if none
    router: int
    norms: int


def count_params(cfg: ModelConfig) -> ParamCount:
    d, hd = cfg.d_model, cfg.resolved_head_dim
    attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o + k, v
    per_expert = 3 * d * cfg.moe_ffn_dim
    dense_ffn = 3 * d * cfg.dense_ffn_dim
    router = d * cfg.n_experts
    norms_per_layer = (4 if cfg.norm_placement == "sandwich" else 2) * d
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    layers = cfg.n_layers
    total_experts = layers * cfg.n_experts * per_expert
    norms = layers * norms_per_layer + d
    total = embedding + layers * (attention + dense_ffn + router) + total_experts + norms
    active = total - layers * (cfg.n_experts - cfg.top_k) * per_expert
    return ParamCount(
        total=total, active=active, embedding=embedding, attention=layers * attention,
        experts=total_experts, per_expert=per_expert, dense_ffn=layers * dense_ffn, router=layers * router, norms=norms,
    )


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights multiplied per token in the forward pass: the active set minus the embedding lookup,
    plus the output projection (the tied embedding is used a second time as a matmul)."""
    p = count_params(cfg)
    lookup = cfg.vocab_size * cfg.d_model
    return p.active - p.norms - lookup + (lookup if cfg.tie_embeddings else 0)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of QK^T and PV for one token attending to `seq_len` keys (no causal halving, as in PaLM)."""
    return 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 2 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward (3x forward) model FLOPs per token: the numerator of MFU."""
    return 3 * forward_flops_per_token(cfg, seq_len)
