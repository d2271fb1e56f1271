"""What one training token costs, independent of the hardware: matmul shapes, tensor sizes, parameters, FLOPs.

A `Workload` is built from a `ModelConfig` (Grok and friends; parameter and FLOP counts come from
`gigafactory.models.flops`) or from the dense, non-gated GPT of the Megatron-LM paper (for calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from gigafactory.config.fields import knob
from gigafactory.models.config import ModelConfig
from gigafactory.models.flops import count_params, training_flops_per_token


@dataclass(frozen=True)
class Workload:
    """Shapes of one decoder (all layers alike) plus its embedding, as the cost model needs them."""

    name: str = knob("model", "Display name.")
    vocab: int = knob(51200, "Vocabulary size (output projection width).")
    d_model: int = knob(1024, "Residual width.")
    n_layers: int = knob(24, "Decoder layers.")
    n_heads: int = knob(16, "Query heads.")
    n_kv_heads: int = knob(16, "Key/value heads.")
    head_dim: int = knob(64, "Width of one head.")
    ffn_dim: int = knob(4096, "Hidden width of the (per-expert) MLP.")
    gated: bool = knob(False, "Gated MLP (3 matrices: act(xW)*(xV) then W_out) instead of 2.")
    n_experts: int = knob(1, "Experts per layer (1 = dense MLP).")
    top_k: int = knob(1, "Experts per token.")
    dense_ffn_dim: int = knob(0, "Gated dense MLP beside the experts (Grok-2); 0 = none.")
    norms_per_layer: int = knob(2, "Norms per layer (Grok sandwich: 4).")
    dropout: bool = knob(False, "Dropout after attention and MLP and on attention probabilities (GPT-era runs).")
    rope: bool = knob(True, "Rotary embeddings applied to q and k.")
    tied_embeddings: bool = knob(True, "Input embedding shared with the output projection.")
    params_total: int = knob(0, "All parameters.")
    params_embedding: int = knob(0, "Embedding (+ untied head) parameters.")
    params_layer_dense: int = knob(0, "Per-layer parameters outside the experts (attention, router, norms, dense MLP).")
    params_expert: int = knob(0, "Parameters of one expert of one layer (the whole MLP when dense).")
    seq_flops_override: tuple = knob((), "(a, b, c): model FLOPs/token = a + b*seq (paper formula); empty = flops.py.")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_gemms(self) -> list[tuple[str, int, int, float]]:
        """Forward matmuls of one layer per token: (group, n_out, k_in, tokens multiplier).

        group is 'attn' (sharded by tp), 'mlp' (dense MLP, sharded by tp) or 'expert' (run by top_k experts);
        the multiplier is how many copies of the token pass through it."""
        d, f = self.d_model, self.ffn_dim
        up = (2 if self.gated else 1) * f
        gemms = [("attn", self.q_width + 2 * self.kv_width, d, 1.0), ("attn", d, self.q_width, 1.0)]
        mlp_group = "expert" if self.is_moe else "mlp"
        mult = float(self.top_k) if self.is_moe else 1.0
        gemms += [(mlp_group, up, d, mult), (mlp_group, d, f, mult)]
        if self.is_moe:
            gemms.append(("router", self.n_experts, d, 1.0))
        if self.dense_ffn_dim:
            gemms += [("mlp", 2 * self.dense_ffn_dim, d, 1.0), ("mlp", d, self.dense_ffn_dim, 1.0)]
        return gemms

    def forward_matmul_flops_per_token(self) -> float:
        """Weight-matmul FLOPs of one token's forward pass, all layers plus the output projection."""
        return _forward_matmul_flops(self)

    def _forward_matmul_flops(self) -> float:
        per_layer = sum(2 * n * k * mult for _, n, k, mult in self.layer_gemms())
        return self.n_layers * per_layer + 2 * self.vocab * self.d_model

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward QK^T and PV FLOPs of one token against `seq_len` keys (no causal halving)."""
        return 4.0 * self.n_layers * self.q_width * seq_len

    def model_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token without recompute (forward + backward): the MFU numerator."""
        if self.seq_flops_override:
            a, b, _ = self.seq_flops_override
            return a + b * seq_len
        return 3.0 * (self.forward_matmul_flops_per_token() + self.attention_flops_per_token(seq_len))


@lru_cache(maxsize=64)
def _forward_matmul_flops(w: Workload) -> float:
    return w._forward_matmul_flops()


def from_model_config(cfg: ModelConfig) -> Workload:
    """A Grok-family (or Mixtral-style) config; parameter counts come from `count_params`."""
    p = count_params(cfg)
    per_layer_dense = (p.attention + p.dense_ffn + p.router) // cfg.n_layers + (p.norms - cfg.d_model) // cfg.n_layers
    return Workload(
        name=cfg.name, vocab=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim, ffn_dim=cfg.moe_ffn_dim, gated=True,
        n_experts=cfg.n_experts, top_k=cfg.top_k, dense_ffn_dim=cfg.dense_ffn_dim,
        norms_per_layer=4 if cfg.norm_placement == "sandwich" else 2, dropout=False, rope=True,
        tied_embeddings=cfg.tie_embeddings, params_total=p.total, params_embedding=p.embedding,
        params_layer_dense=per_layer_dense, params_expert=p.per_expert,
    )


def model_flops_check(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(our FLOPs/token, flops.py's) for a ModelConfig: the two must agree (a test pins it)."""
    return from_model_config(cfg).model_flops_per_token(seq_len), float(training_flops_per_token(cfg, seq_len))


def megatron_gpt(hidden: int, layers: int, heads: int, vocab: int = 51200, seq_len: int = 2048) -> Workload:
    """The GPT of Narayanan et al. (SC21): learned positions, 4h GeLU MLP with biases, dropout, 2 LayerNorms.

    Its FLOPs follow the paper: F = 96 B s l h^2 (1 + s/6h + V/16lh) with recompute, i.e. without recompute
    72 l h^2 + 12 s l h + 6 V h per token."""
    h, l = hidden, layers
    layer = 12 * h * h + 13 * h  # attention 4h^2 + 4h biases, MLP 8h^2 + 5h biases, 2 LayerNorms 4h
    embedding = vocab * h + seq_len * h
    return Workload(
        name=f"gpt-{h}x{l}", vocab=vocab, d_model=h, n_layers=l, n_heads=heads, n_kv_heads=heads,
        head_dim=h // heads, ffn_dim=4 * h, gated=False, norms_per_layer=2, dropout=True, rope=False,
        tied_embeddings=True, params_total=l * layer + embedding + 2 * h, params_embedding=embedding,
        params_layer_dense=layer, params_expert=0,
        seq_flops_override=(72.0 * l * h * h + 6.0 * vocab * h, 12.0 * l * h, 0.0),
    )
