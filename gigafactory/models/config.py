"""ModelConfig: every architectural constant of the Grok family is a field here, so variants are presets, not forks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key and how to fix it (shown as one line by the CLI)."""


@dataclass
class ModelConfig:
    """Architecture of a Grok-family decoder (defaults: grok-tiny)."""

    name: str = knob("grok-tiny", "Preset this config started from (informational; set with --model.preset).")
    vocab_size: int = knob(4096, "Vocabulary size; must be >= the tokenizer's vocabulary.")
    d_model: int = knob(256, "Residual stream width (Grok-1: 6144).")
    n_layers: int = knob(4, "Number of decoder layers (Grok-1: 64).")
    n_heads: int = knob(4, "Query heads (Grok-1: 48).")
    n_kv_heads: int = knob(2, "Key/value heads for grouped-query attention; must divide n_heads (Grok-1: 8).")
    head_dim: int = knob(0, "Per-head width; 0 means d_model // n_heads (Grok-1: 128).")
    max_seq_len: int = knob(256, "Longest context the model is built for (Grok-1: 8192).")
    n_experts: int = knob(8, "Experts per MoE layer (Grok-1: 8).")
    top_k: int = knob(2, "Experts each token is routed to (Grok-1: 2).")
    moe_ffn_dim: int = knob(512, "Hidden width of one expert FFN (Grok-1: 32768).")
    dense_ffn_dim: int = knob(0, "Width of a dense FFN run in parallel with the experts (Grok-2: 32768); 0 = none.")
    activation: str = knob("gelu_tanh", "Gated FFN activation: act(x W) * (x V) then W_out.", choices=("gelu_tanh", "silu"))
    norm_placement: str = knob(
        "sandwich",
        "'sandwich' (Grok: RMSNorm before and after attention and MoE) or 'pre' (Llama/Mixtral pre-norm).",
        choices=("sandwich", "pre"),
    )
    norm_eps: float = knob(1e-5, "RMSNorm epsilon (computed in fp32).")
    rope_theta: float = knob(10000.0, "Rotary embedding base (NeoX half-split rotation).")
    attn_scale: float = knob(0.0, "Multiplier on QK logits; 0 means 1/sqrt(head_dim) (Grok-1: 0.08838834764831845).")
    attn_softcap: float = knob(30.0, "Cap attention logits as c*tanh(x/c) after scaling; 0 disables (Grok-1: 30).")
    embedding_multiplier: float = knob(16.0, "Token embeddings are multiplied by this (Grok-1: sqrt(6144)=78.38...).")
    output_multiplier: float = knob(0.5773502691896257, "Output logits are multiplied by this (Grok-1: 1/sqrt(3)).")
    final_logit_softcap: float = knob(0.0, "Cap output logits as c*tanh(x/c) after the multiplier; 0 disables (Grok-2: 50).")
    tie_embeddings: bool = knob(True, "Share the input embedding with the output projection (Grok-1: true).")
    router_renormalize: bool = knob(False, "Renormalise the top-k router probabilities to sum to 1 (Grok-1: false).")
    router_softcap: float = knob(0.0, "Cap router logits as c*tanh(x/c) before the softmax; 0 disables (Grok-2: 30).")
    aux_loss_weight: float = knob(0.01, "Weight of the Switch-style load-balancing loss added to the training loss.")
    router_z_loss_weight: float = knob(0.0, "Weight of the router z-loss (mean squared logsumexp of router logits).")
    init_std: float = knob(0.02, "Std of the normal init of weight matrices and embeddings.")
    attn_impl: str = knob(
        "auto",
        "Capped attention kernel: 'flex' (fused FlexAttention, compiled; forward-only on CPU), 'eager' (materialised "
        "logits), or 'auto' (flex on CUDA, eager elsewhere). Uncapped attention always uses SDPA.",
        choices=("auto", "eager", "flex"),
    )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_attn_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.resolved_head_dim)

    def validate(self) -> None:
        """Reject impossible shapes with a message naming the key and the fix."""
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "n_experts", "top_k", "moe_ffn_dim")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                "pick n_heads dividing d_model or set model.head_dim"
            )
        if self.head_dim < 0 or self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim={self.resolved_head_dim} must be a positive even number (rotary embeddings)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}; use top_k <= n_experts")
        for key in ("norm_eps", "rope_theta", "init_std"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        for key in ("attn_softcap", "final_logit_softcap", "router_softcap", "aux_loss_weight", "router_z_loss_weight", "dense_ffn_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0 disables it)")
