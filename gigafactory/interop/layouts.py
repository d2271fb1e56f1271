"""The three safetensors layouts Gigafactory exports and imports: names, shapes, config.json, and what each can hold.

- hf-grok1:    the hpcai-tech/grok-1 names that vLLM's `grok1` model loads (attn.{q,k,v,o}_proj, moe_block.gate,
               moe_block.experts.e.{linear,linear_v,linear_1}, *_norm.scale).
- sglang-grok: the Mixtral-style names SGLang's Grok loader expects (self_attn.*, block_sparse_moe.experts.e.{w1,w2,w3},
               the four Grok norms, an explicit lm_head); also Grok-2's dense mlp.{gate,up,down}_proj.
- hf-mixtral:  transformers' MixtralForCausalLM (pre-norm, SiLU experts, no caps or multipliers).
Every mapping is an `Entry`: a target tensor is Gigafactory parameter `key`, optionally one expert of a stacked
[E, in, out] tensor, optionally transposed to [out, in]. docs/interop.md lists the tables.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gigafactory.errors import UserError
from gigafactory.models.config import ModelConfig

FORMATS = ("hf-grok1", "sglang-grok", "hf-mixtral")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# The Grok layouts carry their own transformers code (hf_code/, copied into the export): a model_type transformers
# does not know makes it refuse without trust_remote_code (model_type "git" silently built a random GitForCausalLM).
HF_CODE_FILES = ("configuration_gigafactory_grok.py", "modeling_gigafactory_grok.py")
REMOTE_CODE = {
    "model_type": "gigafactory-grok",
    "auto_map": {"AutoConfig": "configuration_gigafactory_grok.GigafactoryGrokConfig",
                 "AutoModelForCausalLM": "modeling_gigafactory_grok.GigafactoryGrokForCausalLM"},
}


@dataclass(frozen=True)
class Entry:
    name: str  # tensor name in the target layout
    key: str  # Gigafactory parameter
    expert: int | None = None  # one expert of a stacked [E, in, out] parameter
    transpose: bool = False  # target stores [out, in] where Gigafactory stores [in, out]


# Per-layer names: (Gigafactory suffix, hf-grok1, sglang-grok, hf-mixtral); None = the layout has no such tensor.
_LAYER_NAMES = [
    ("attn.wq.weight", "attn.q_proj.weight", "self_attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "attn.k_proj.weight", "self_attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "attn.v_proj.weight", "self_attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "attn.o_proj.weight", "self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("moe.router.weight", "moe_block.gate.weight", "block_sparse_moe.gate.weight", "block_sparse_moe.gate.weight"),
    ("pre_attn_norm.weight", "pre_attn_norm.scale", "pre_attn_norm.weight", "input_layernorm.weight"),
    ("post_attn_norm.weight", "post_attn_norm.scale", "post_attn_norm.weight", None),
    ("pre_moe_norm.weight", "pre_moe_norm.scale", "pre_moe_norm.weight", "post_attention_layernorm.weight"),
    ("post_moe_norm.weight", "post_moe_norm.scale", "post_moe_norm.weight", None),
    ("dense.w_gate.weight", None, "mlp.gate_proj.weight", None),
    ("dense.w_up.weight", None, "mlp.up_proj.weight", None),
    ("dense.w_down.weight", None, "mlp.down_proj.weight", None),
]
# Expert weights: Gigafactory stacked [E, in, out] -> per-expert [out, in] under these names.
_EXPERT_NAMES = {
    "hf-grok1": ("moe_block.experts.{e}.", {"w_gate": "linear", "w_up": "linear_v", "w_down": "linear_1"}),
    "sglang-grok": ("block_sparse_moe.experts.{e}.", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}),
    "hf-mixtral": ("block_sparse_moe.experts.{e}.", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}),
}
_TOP_NAMES = {  # (embedding, final norm)
    "hf-grok1": ("model.embed_tokens.weight", "model.norm.scale"),
    "sglang-grok": ("model.embed_tokens.weight", "model.norm.weight"),
    "hf-mixtral": ("model.embed_tokens.weight", "model.norm.weight"),
}


def entries(fmt: str, cfg: ModelConfig) -> list[Entry]:
    """Every tensor of `cfg` exported as `fmt`, grouped so each Gigafactory parameter is read once."""
    column = 1 + FORMATS.index(fmt)
    embed, norm = _TOP_NAMES[fmt]
    out = [Entry(embed, "embed.weight"), Entry(norm, "norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", "lm_head.weight"))
    elif fmt == "sglang-grok":  # SGLang never ties: it needs an explicit lm_head (a copy of the embedding)
        out.append(Entry("lm_head.weight", "embed.weight"))
    prefix, experts = _EXPERT_NAMES[fmt]
    for layer in range(cfg.n_layers):
        base = f"model.layers.{layer}."
        for row in _LAYER_NAMES:
            name = row[column]
            if name is None or (row[0].startswith("post_") and cfg.norm_placement != "sandwich"):
                continue
            if row[0].startswith("dense.") and not cfg.dense_ffn_dim:
                continue
            out.append(Entry(base + name, f"layers.{layer}.{row[0]}"))
        for param, short in experts.items():
            for e in range(cfg.n_experts):
                out.append(Entry(base + prefix.format(e=e) + short + ".weight", f"layers.{layer}.moe.experts.{param}", e, True))
    return out


# ---- what each target can represent -------------------------------------------------------------------------
def check_exportable(fmt: str, cfg: ModelConfig) -> None:
    """Raise UserError naming the first ModelConfig field the target engine cannot represent."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    default_scale = 1.0 / math.sqrt(cfg.resolved_head_dim)
    rules: list[tuple[str, bool, str]] = [
        ("attn_scale", math.isclose(cfg.resolved_attn_scale, default_scale, rel_tol=1e-6), "the engine scales attention logits by 1/sqrt(head_dim)"),
    ]
    if fmt in ("hf-grok1", "sglang-grok"):
        rules += [
            ("norm_placement", cfg.norm_placement == "sandwich", "Grok engines use 4 sandwich norms per layer; use hf-mixtral for 'pre'"),
            ("activation", cfg.activation == "gelu_tanh", "Grok engines run GELU experts; use hf-mixtral for SiLU"),
        ]
    if fmt == "hf-grok1":
        rules += [
            ("dense_ffn_dim", cfg.dense_ffn_dim == 0, "vLLM's Grok-1 layout has no dense FFN beside the experts; use sglang-grok"),
            ("head_dim", cfg.resolved_head_dim * cfg.n_heads == cfg.d_model, "vLLM's grok1 derives head_dim = d_model / n_heads"),
            ("final_logit_softcap", cfg.final_logit_softcap == 0, "the Grok-1 layout has no final logit cap; use sglang-grok"),
        ]
    if fmt == "sglang-grok":
        rules += [
            ("router_renormalize", not cfg.router_renormalize, "SGLang's Grok router never renormalises the top-k gates"),
            ("router_softcap", cfg.router_softcap in (0.0, 30.0), "SGLang hard-codes a router cap of 30 (0 is exported as the Grok-1 deviation)"),
        ]
    if fmt == "hf-mixtral":
        rules += [
            ("norm_placement", cfg.norm_placement == "pre", "Mixtral is pre-norm (start from the mixtral-tiny preset)"),
            ("activation", cfg.activation == "silu", "Mixtral experts use SiLU"),
            ("dense_ffn_dim", cfg.dense_ffn_dim == 0, "Mixtral has no dense FFN beside the experts"),
            ("attn_softcap", cfg.attn_softcap == 0, "Mixtral does not cap attention logits"),
            ("router_softcap", cfg.router_softcap == 0, "Mixtral does not cap router logits"),
            ("final_logit_softcap", cfg.final_logit_softcap == 0, "Mixtral does not cap output logits"),
            ("embedding_multiplier", cfg.embedding_multiplier == 1.0, "Mixtral does not scale embeddings"),
            ("output_multiplier", cfg.output_multiplier == 1.0, "Mixtral does not scale logits"),
            ("router_renormalize", cfg.router_renormalize, "Mixtral always renormalises the top-k gates"),
        ]
    for field, ok, why in rules:
        if not ok:
            raise UserError(f"cannot export to {fmt}: model.{field}={getattr(cfg, field)!r} is not representable ({why})")


# ---- config.json ------------------------------------------------------------------------------------------------
def config_json(fmt: str, cfg: ModelConfig, dtype_name: str) -> dict:
    """The config.json each engine reads, plus a "gigafactory" block that makes the import exact."""
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype_name]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope, "num_experts_per_tok": cfg.top_k, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "torch_dtype": torch_dtype, "dtype": torch_dtype,
    }
    if fmt == "hf-grok1":
        out = {
            "architectures": ["Grok1ModelForCausalLM"], **REMOTE_CODE, **common,
            "intermediate_size": cfg.moe_ffn_dim, "num_experts": cfg.n_experts, "num_local_experts": cfg.n_experts,
            # vLLM multiplies the o_proj output (not the logits) by this; 1.0 keeps Gigafactory's computation exact.
            "attn_output_multiplier": 1.0,
            "embedding_multiplier_scale": cfg.embedding_multiplier, "output_multiplier_scale": cfg.output_multiplier,
            "max_attn_value": cfg.attn_softcap, "attn_logit_softcapping": cfg.attn_softcap,
            "router_logit_softcapping": cfg.router_softcap, "moe_renormalize": cfg.router_renormalize,
            "moe_router_renormalize": cfg.router_renormalize,
        }
    elif fmt == "sglang-grok":
        out = {
            "architectures": ["Grok1ForCausalLM"], **REMOTE_CODE, **common, "tie_word_embeddings": False,
            "num_local_experts": cfg.n_experts, "embedding_multiplier_scale": cfg.embedding_multiplier,
            "output_multiplier_scale": cfg.output_multiplier, "attn_logit_softcapping": cfg.attn_softcap,
            "attn_logit_softcapping_method": "tanh", "attn_temperature_len": -1,
            # the model's own value (SGLang applies 30 whatever this says: `engine_deviations` warns about it)
            "router_logit_softcapping": cfg.router_softcap, "final_logit_softcapping": cfg.final_logit_softcap or None,
            "load_presharded_moe": False, "load_presharded_attn": False, "load_presharded_mlp": False,
            "load_presharded_embedding": False, "context_len": cfg.max_seq_len,
        }
        if cfg.dense_ffn_dim:
            out.update({"residual_moe": True, "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": cfg.moe_ffn_dim})
        else:
            out["intermediate_size"] = cfg.moe_ffn_dim
    else:
        out = {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
            "intermediate_size": cfg.moe_ffn_dim, "num_local_experts": cfg.n_experts, "hidden_act": "silu",
            "sliding_window": None, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
            "router_aux_loss_coef": cfg.aux_loss_weight, "output_router_logits": False, "use_cache": True,
        }
    out["gigafactory"] = {"format": fmt, "model": dataclasses.asdict(cfg)}
    return out


def detect_format(config: dict, names: set[str]) -> str:
    """Which of FORMATS a directory holds, from its config.json and tensor names."""
    recorded = config.get("gigafactory", {}).get("format")
    if recorded in FORMATS:
        return recorded
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch == "MixtralForCausalLM":
        return "hf-mixtral"
    if any(".moe_block." in n for n in names):
        return "hf-grok1"
    if any(".block_sparse_moe." in n for n in names) and arch.startswith("Grok"):
        return "sglang-grok"
    raise UserError(f"config.json architectures {config.get('architectures')} with these tensor names is not a layout Gigafactory reads; "
                    f"expected one of: {', '.join(FORMATS)}")
