"""What one training token costs, independent of the hardware: matmul shapes, tensor sizes, parameters, FLOPs.

A `Workload` is built from a `ModelConfig` (Grok and friends; parameter and FLOP counts come from
`gigafactory.models.flops`) or from the dense, non-gated GPT of the Megatron-LM paper (for calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

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
    head_dim: int = knob(64, "Width of one head (query/key and value alike unless MLA sets them).")
    attention: str = knob("gqa", "'gqa' (MHA when n_kv_heads = n_heads, MQA when 1) or 'mla' (DeepSeek low-rank KV).", choices=("gqa", "mla"))
    q_lora_rank: int = knob(0, "MLA: rank of the query down-projection (0 = full-rank queries).")
    kv_lora_rank: int = knob(0, "MLA: rank of the joint key/value compression (DeepSeek-V3: 512).")
    rope_head_dim: int = knob(0, "MLA: decoupled rotary part of each query/key head (DeepSeek-V3: 64).")
    v_head_dim: int = knob(0, "MLA: value head width (0 = head_dim).")
    ffn_dim: int = knob(4096, "Hidden width of the (per-expert) MLP.")
    gated: bool = knob(False, "Gated MLP (3 matrices: act(xW)*(xV) then W_out) instead of 2.")
    n_experts: int = knob(1, "Routed experts per layer (1 = dense MLP).")
    top_k: int = knob(1, "Routed experts per token.")
    n_shared_experts: int = knob(0, "Experts every token passes through, beside the routed ones (DeepSeek: 1).")
    n_dense_layers: int = knob(0, "Leading layers with a dense MLP instead of experts (DeepSeek-V3: 3).")
    dense_layer_ffn_dim: int = knob(0, "Hidden width of those dense leading layers' MLP (0 = ffn_dim * top_k).")
    capacity_factor: float = knob(0.0, "Expert capacity / mean tokens per expert (tokens beyond it dropped, buffers padded to it); 0 = dropless.")
    node_limit: int = knob(0, "Each token's experts lie on at most this many nodes (DeepSeek-V3: 4); 0 = unlimited.")
    dense_ffn_dim: int = knob(0, "Gated dense MLP beside the experts (Grok-2); 0 = none.")
    norms_per_layer: int = knob(2, "Norms per layer (Grok sandwich: 4).")
    dropout: bool = knob(False, "Dropout after attention and MLP and on attention probabilities (GPT-era runs).")
    rope: bool = knob(True, "Rotary embeddings applied to q and k.")
    tied_embeddings: bool = knob(True, "Input embedding shared with the output projection.")
    params_total: int = knob(0, "All parameters (checkpoint size, failure recovery); per-layer counts come from the shapes.")
    seq_flops_override: tuple = knob((), "(a, b, c): model FLOPs/token = a + b*seq (paper formula); empty = flops.py.")

    @cached_property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @cached_property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.is_moe else 0

    @property
    def qk_head_dim(self) -> int:
        """Query/key width of one head as the attention core sees it (MLA: no-rope part + rotary part)."""
        return self.head_dim + (self.rope_head_dim if self.attention == "mla" else 0)

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of K and V per token as stored and sent between context-parallel ranks."""
        if self.attention == "mla":
            return self.n_heads * (self.qk_head_dim + self.value_head_dim) // 2
        return self.n_kv_heads * self.head_dim

    def attention_gemms(self) -> list[tuple[str, int, int, float]]:
        """Projections of one layer's attention: (group, n_out, k_in, multiplier); 'attn' is split by tp,
        'attn_rep' (MLA's down-projections, small) is replicated over tp."""
        d, h = self.d_model, self.n_heads
        if self.attention != "mla":
            return [("attn", self.q_width + 2 * self.kv_width, d, 1.0), ("attn", d, h * self.value_head_dim, 1.0)]
        gemms = []
        if self.q_lora_rank:
            gemms += [("attn_rep", self.q_lora_rank, d, 1.0), ("attn", h * self.qk_head_dim, self.q_lora_rank, 1.0)]
        else:
            gemms.append(("attn", h * self.qk_head_dim, d, 1.0))
        gemms += [("attn_rep", self.kv_lora_rank + self.rope_head_dim, d, 1.0),
                  ("attn", h * (self.head_dim + self.value_head_dim), self.kv_lora_rank, 1.0),
                  ("attn", d, h * self.value_head_dim, 1.0)]
        return gemms

    def layer_gemms(self, moe: bool | None = None) -> list[tuple[str, int, int, float]]:
        """Forward matmuls of one layer per token: (group, n_out, k_in, tokens multiplier).

        group is 'attn' (sharded by tp), 'mlp' (dense MLP, sharded by tp), 'expert' (run by top_k experts) or
        'router'; the multiplier is how many copies of the token pass through it. `moe` False prices one of the
        dense leading layers of an MoE model (default: an expert layer when the model has experts)."""
        moe = self.is_moe if moe is None else moe
        d, f = self.d_model, self.ffn_dim
        width = 2 if self.gated else 1
        gemms = self.attention_gemms()
        if moe:
            gemms += [("expert", width * f, d, float(self.top_k)), ("expert", d, f, float(self.top_k)),
                      ("router", self.n_experts, d, 1.0)]
            if self.n_shared_experts:
                s = f * self.n_shared_experts
                gemms += [("mlp", width * s, d, 1.0), ("mlp", d, s, 1.0)]
        else:
            fd = (self.dense_layer_ffn_dim or f * self.top_k) if self.is_moe else f
            gemms += [("mlp", width * fd, d, 1.0), ("mlp", d, fd, 1.0)]
        if self.dense_ffn_dim:
            gemms += [("mlp", 2 * self.dense_ffn_dim, d, 1.0), ("mlp", d, self.dense_ffn_dim, 1.0)]
        return gemms

    def layer_params(self, moe: bool | None = None) -> tuple[float, float]:
        """(parameters outside the experts, all routed experts' parameters) of one layer, from its matmul shapes."""
        moe = self.is_moe if moe is None else moe
        return self._layer_params[moe]

    @cached_property
    def _layer_params(self) -> dict:
        return {moe: self._count_layer_params(moe) for moe in (False, True)}

    def _count_layer_params(self, moe: bool) -> tuple[float, float]:
        gemms = self.layer_gemms(moe)
        dense = sum(n * k for g, n, k, _ in gemms if g != "expert") + self.norms_per_layer * self.d_model
        experts = sum(n * k for g, n, k, _ in gemms if g == "expert") * self.n_experts
        return float(dense), float(experts)

    def shape_params(self) -> float:
        """All parameters from the matmul shapes: layers, routed experts, embedding (+ an untied head)."""
        dense_d, _ = self.layer_params(False)
        moe_d, moe_e = self.layer_params(True) if self.is_moe else (dense_d, 0.0)
        n_dense = self.n_layers - self.n_moe_layers
        table = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_moe_layers * (moe_d + moe_e) + n_dense * dense_d + table

    def forward_matmul_flops_per_token(self) -> float:
        """Weight-matmul FLOPs of one token's forward pass, all layers plus the output projection."""
        return _forward_matmul_flops(self)

    def _forward_matmul_flops(self) -> float:
        def per_layer(moe: bool) -> float:
            return sum(2 * n * k * mult for _, n, k, mult in self.layer_gemms(moe))

        dense_layers = self.n_layers - self.n_moe_layers
        return self.n_moe_layers * per_layer(True) + dense_layers * per_layer(False) + 2 * self.vocab * self.d_model

    def attention_flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Forward QK^T and PV FLOPs of one token against `seq_len` keys: all of them (PaLM's and Megatron's MFU
        convention) or, `causal`, the half a causal mask leaves (what fused kernels execute; Llama 3's convention)."""
        full = 2.0 * self.n_layers * self.n_heads * (self.qk_head_dim + self.value_head_dim) * seq_len
        return full / 2 if causal else full

    def model_flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per token without recompute (forward + backward): the MFU numerator, with full attention
        (default) or causal-halved attention."""
        if self.seq_flops_override:
            a, b, _ = self.seq_flops_override
            return a + b * seq_len * (0.5 if causal else 1.0)
        return 3.0 * (self.forward_matmul_flops_per_token() + self.attention_flops_per_token(seq_len, causal))


@lru_cache(maxsize=64)
def _forward_matmul_flops(w: Workload) -> float:
    return w._forward_matmul_flops()


def from_model_config(cfg: ModelConfig) -> Workload:
    """A Grok-family (or Mixtral-style) config; parameter counts come from `count_params`."""
    p = count_params(cfg)
    return Workload(
        name=cfg.name, vocab=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim, ffn_dim=cfg.moe_ffn_dim, gated=True,
        n_experts=cfg.n_experts, top_k=cfg.top_k, dense_ffn_dim=cfg.dense_ffn_dim,
        norms_per_layer=4 if cfg.norm_placement == "sandwich" else 2, dropout=False, rope=True,
        tied_embeddings=cfg.tie_embeddings, params_total=p.total,
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
        tied_embeddings=True, params_total=l * layer + embedding + 2 * h,
        seq_flops_override=(72.0 * l * h * h + 6.0 * vocab * h, 12.0 * l * h, 0.0),
    )
