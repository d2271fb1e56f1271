"""The Grok decoder as a vLLM model (vLLM 0.32 model interface), computing what Gigafactory's GrokModel computes.

Loaded by vLLM only (the plugin in __init__.py names this module as a string). The architecture comes from the
"gigafactory" block of config.json, which every export writes (interop/layouts.py), so nothing is guessed from
engine fields: sandwich RMSNorms in fp32 (scale used as is), GQA with NeoX rotary embeddings and
cap·tanh(scale·q·k / cap) attention logits (vLLM's attention `logits_soft_cap`), an fp32 router with the model's own
cap (none for Grok-1) and renormalisation flag, experts with the tanh GELU (vLLM's fused MoE, activation
"gelu_tanh"), Grok-2's dense FFN beside the experts, embeddings times embedding_multiplier, hidden states times
output_multiplier before the (tied or separate) head, and the optional final logit cap. Tensor parallelism shards
attention, experts and the dense FFN as in vLLM's own MoE models.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from gigafactory.interop.vllm_grok.names import FUSED_MOE_NAMES, export_names

# vLLM's fused-MoE activation for each Gigafactory `activation` (both gated: act(x W_gate) * (x W_up)).
MOE_ACTIVATIONS = {"gelu_tanh": "gelu_tanh", "silu": "silu"}


def architecture(hf_config) -> dict:
    """The exported ModelConfig (as a dict) from config.json's "gigafactory" block; a clear error without it."""
    block = getattr(hf_config, "gigafactory", None)
    if not isinstance(block, dict) or not isinstance(block.get("model"), dict):
        raise ValueError("config.json has no \"gigafactory\" block: this vLLM model serves exports written by "
                         "`gigafactory export --format hf-grok1|sglang-grok`; re-export the checkpoint")
    m = block["model"]
    if m["norm_placement"] != "sandwich":
        raise ValueError(f"model.norm_placement={m['norm_placement']!r}: Grok exports are sandwich-norm models")
    if m["activation"] not in MOE_ACTIVATIONS:
        raise ValueError(f"model.activation={m['activation']!r} is not one of {sorted(MOE_ACTIVATIONS)}")
    return m


def head_dim_of(m: dict) -> int:
    return m["head_dim"] or m["d_model"] // m["n_heads"]


def gated(name: str, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") if name == "gelu_tanh" else F.silu(gate)) * up


class GrokRMSNorm(nn.Module):
    """y = weight * x / rms(x) in fp32, cast back: Gigafactory's RMSNorm (vLLM's casts before the weight multiply)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class GrokAttention(nn.Module):
    def __init__(self, m: dict, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        head_dim = head_dim_of(m)
        n_heads, n_kv = m["n_heads"], m["n_kv_heads"]
        if n_heads % tp or (n_kv % tp and tp % n_kv):
            raise ValueError(f"tensor parallel size {tp} does not divide n_heads={n_heads} / n_kv_heads={n_kv}")
        self.q_size, self.kv_size = n_heads // tp * head_dim, max(1, n_kv // tp) * head_dim
        self.qkv_proj = QKVParallelLinear(m["d_model"], head_dim, n_heads, n_kv, bias=False, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(n_heads * head_dim, m["d_model"], bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(head_dim, max_position=max_position, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]})
        self.attn = Attention(n_heads // tp, head_dim, m["attn_scale"] or head_dim**-0.5, num_kv_heads=max(1, n_kv // tp),
                              cache_config=cache_config, quant_config=quant_config,
                              logits_soft_cap=m["attn_softcap"] or None, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class GrokRouter(nn.Module):
    """Router logits x·Wᵀ in fp32 (the weight is kept fp32, as Gigafactory stores it), capped only if the model is."""

    def __init__(self, m: dict):
        super().__init__()
        self.cap = m["router_softcap"]
        self.weight = nn.Parameter(torch.empty(m["n_experts"], m["d_model"], dtype=torch.float32))
        self.weight.weight_loader = default_weight_loader  # casts the exported dtype to fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.float() @ self.weight.t()
        return self.cap * torch.tanh(logits / self.cap) if self.cap else logits


class GrokMoE(nn.Module):
    def __init__(self, m: dict, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate = GrokRouter(m)
        # vLLM's fused MoE: softmax over all experts, top-k of the probabilities, gates renormalised only if asked
        # (Grok-1: not); the logits it gets are already Grok's (fp32, capped or not).
        self.experts = FusedMoEFactory(
            num_experts=m["n_experts"], top_k=m["top_k"], hidden_size=m["d_model"], intermediate_size=m["moe_ffn_dim"],
            renormalize=m["router_renormalize"], quant_config=quant_config, prefix=f"{prefix}.experts",
            activation=MOE_ACTIVATIONS[m["activation"]], ckpt_names=FUSED_MOE_NAMES,
            router_logits_dtype=torch.float32,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class GrokDenseFFN(nn.Module):
    """Grok-2's dense gated FFN beside the experts (sglang-grok `mlp.{gate,up,down}_proj`)."""

    def __init__(self, m: dict, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width = m["dense_ffn_dim"]
        self.activation = m["activation"]
        self.gate_up_proj = MergedColumnParallelLinear(m["d_model"], [width, width], bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(width, m["d_model"], bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(gated(self.activation, gate_up))
        return out


class GrokDecoderLayer(nn.Module):
    """h += post_attn_norm(attn(pre_attn_norm(h))); h += post_moe_norm(moe(pre_moe_norm(h)) [+ dense, / sqrt 2])."""

    def __init__(self, m: dict, max_position: int, cache_config, quant_config, prefix: str):
        super().__init__()
        d, eps = m["d_model"], m["norm_eps"]
        self.pre_attn_norm, self.post_attn_norm = GrokRMSNorm(d, eps), GrokRMSNorm(d, eps)
        self.pre_moe_norm, self.post_moe_norm = GrokRMSNorm(d, eps), GrokRMSNorm(d, eps)
        self.self_attn = GrokAttention(m, max_position, cache_config, quant_config, f"{prefix}.self_attn")
        self.moe = GrokMoE(m, quant_config, f"{prefix}.moe")
        self.mlp = GrokDenseFFN(m, quant_config, f"{prefix}.mlp") if m["dense_ffn_dim"] else None

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attn_norm(self.self_attn(positions, self.pre_attn_norm(h)))
        x = self.pre_moe_norm(h)
        f = self.moe(x)
        if self.mlp is not None:  # Grok-2: (moe + mlp) / sqrt(2)
            f = (f + self.mlp(x)) * 2**-0.5
        return h + self.post_moe_norm(f)


class GrokDecoder(nn.Module):
    def __init__(self, m: dict, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.embedding_multiplier = m["embedding_multiplier"]
        max_position = max(m["max_seq_len"], vllm_config.model_config.max_model_len)
        self.embed_tokens = VocabParallelEmbedding(m["vocab_size"], m["d_model"], prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            GrokDecoderLayer(m, max_position, vllm_config.cache_config, vllm_config.quant_config,
                             f"{prefix}.layers.{i}")
            for i in range(m["n_layers"])
        )
        self.norm = GrokRMSNorm(m["d_model"], m["norm_eps"])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embedding_multiplier

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class GigafactoryGrokForVLLM(nn.Module):
    """vLLM's entry class for `Grok1ModelForCausalLM` (hf-grok1) and `Grok1ForCausalLM` (sglang-grok) exports."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        m = architecture(config)
        self.config, self.m = config, m
        self.names = export_names(config.gigafactory.get("format"))
        self.model = GrokDecoder(m, vllm_config, "model" if not prefix else f"{prefix}.model")
        self.output_multiplier = m["output_multiplier"]
        self.lm_head = ParallelLMHead(m["vocab_size"], m["d_model"], quant_config=vllm_config.quant_config,
                                      prefix="lm_head" if not prefix else f"{prefix}.lm_head")
        if m["tie_embeddings"] and not self.names.explicit_lm_head:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(m["vocab_size"], soft_cap=m["final_logit_softcap"] or None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # (h * m) Wᵀ, as GrokModel scales the hidden states rather than the logits
        return self.logits_processor(self.lm_head, hidden_states * self.output_multiplier)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every exported tensor into its parameter; a name the layout does not have is an error, never skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self.names.translate(name)
            if target.expert is not None:
                experts = self.get_submodule(target.param)
                loaded.update(f"{target.param}.{p}" for p in experts.load_weights([(target.expert, tensor)]))
                continue
            if target.param not in params:
                raise ValueError(f"export tensor {name!r} has no parameter {target.param!r} in this model")
            param = params[target.param]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if target.shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, target.shard)
            loaded.add(target.param)
        return loaded

