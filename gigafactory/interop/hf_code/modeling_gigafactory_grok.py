"""transformers model for Gigafactory's Grok exports (hf-grok1 and sglang-grok names), shipped inside each export.

`AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)` builds this class; it computes exactly what
Gigafactory's GrokModel computes (the "gigafactory" block of config.json holds every architectural constant):
sandwich RMSNorms in fp32, grouped-query attention with NeoX rotary embeddings and tanh-capped logits (softmax in
fp32), a top-k MoE of gated-GELU (tanh) experts with an fp32 router (optional cap and renormalisation), Grok-2's dense
FFN beside the experts, scaled embeddings and output logits, an optional final logit cap.

It is a reference implementation with no KV cache: each generation step recomputes the prefix, which is exact and
simple but O(n^2). Serve with vLLM or SGLang for speed. Self-contained: it imports torch and transformers only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_gigafactory_grok import GigafactoryGrokConfig
except ImportError:  # loaded as a top-level module (tests, or copied elsewhere)
    from configuration_gigafactory_grok import GigafactoryGrokConfig

# Tensor names per export format: attention, MoE block, expert (gate, up, down), dense MLP, norm parameter name.
NAMES = {
    "hf-grok1": ("attn", "moe_block", ("linear", "linear_v", "linear_1"), None, "scale"),
    "sglang-grok": ("self_attn", "block_sparse_moe", ("w1", "w3", "w2"), "mlp", "weight"),
}


def _arch(config) -> tuple[dict, tuple]:
    block = getattr(config, "gigafactory", None) or {}
    if block.get("format") not in NAMES or not isinstance(block.get("model"), dict):
        raise ValueError("config.json has no Gigafactory hf-grok1/sglang-grok \"gigafactory\" block; re-export with `gigafactory export`")
    return block["model"], NAMES[block["format"]]


class RMSNorm(nn.Module):
    """y = scale * x / rms(x) in fp32; the parameter is named `scale` (hf-grok1) or `weight` (sglang-grok)."""

    def __init__(self, dim: int, eps: float, param: str):
        super().__init__()
        self.eps, self.param = eps, param
        self.register_parameter(param, nn.Parameter(torch.ones(dim)))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * getattr(self, self.param).float()
        return y.to(x.dtype)


def rope(x, positions, theta: float):
    """NeoX half-split rotary embedding of x [B, H, S, Dh] at positions [B, S], in fp32."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        self.n_heads, self.n_kv = m["n_heads"], m["n_kv_heads"]
        self.head_dim = m["head_dim"] or m["d_model"] // m["n_heads"]
        self.scale = m["attn_scale"] or 1.0 / math.sqrt(self.head_dim)
        self.cap, self.theta = m["attn_softcap"], m["rope_theta"]
        self.q_proj = nn.Linear(m["d_model"], self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(m["d_model"], self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(m["d_model"], self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, m["d_model"], bias=False)

    def forward(self, x, positions, mask):
        B, S, _ = x.shape
        q = rope(self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2), positions, self.theta)
        k = rope(self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2), positions, self.theta)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        group = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        logits = (q @ k.transpose(-1, -2)).float() * self.scale
        if self.cap:
            logits = self.cap * torch.tanh(logits / self.cap)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, S, -1))


class Expert(nn.Module):
    def __init__(self, d_model: int, ffn: int, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(d_model, ffn, bias=False))
        self.add_module(up, nn.Linear(d_model, ffn, bias=False))
        self.add_module(down, nn.Linear(ffn, d_model, bias=False))

    def forward(self, x, act):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(act(gate(x)) * up(x))


class MoE(nn.Module):
    def __init__(self, m: dict, expert_names):
        super().__init__()
        self.top_k, self.cap, self.renormalize = m["top_k"], m["router_softcap"], m["router_renormalize"]
        self.gate = nn.Linear(m["d_model"], m["n_experts"], bias=False)
        self.experts = nn.ModuleList(Expert(m["d_model"], m["moe_ffn_dim"], expert_names) for _ in range(m["n_experts"]))

    def forward(self, x, act):
        flat = x.reshape(-1, x.shape[-1])
        logits = flat.float() @ self.gate.weight.float().t()
        if self.cap:
            logits = self.cap * torch.tanh(logits / self.cap)
        probs = logits.softmax(dim=-1)
        gates, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, (expert(flat[rows], act) * gates[rows, slot, None].to(flat.dtype)))
        return out.view_as(x)


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn, bias=False)
        self.up_proj = nn.Linear(d_model, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x, act):
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, m: dict, names):
        super().__init__()
        attn, moe, experts, mlp, param = names
        self.names = names
        eps = m["norm_eps"]
        self.pre_attn_norm, self.post_attn_norm = RMSNorm(m["d_model"], eps, param), RMSNorm(m["d_model"], eps, param)
        self.pre_moe_norm, self.post_moe_norm = RMSNorm(m["d_model"], eps, param), RMSNorm(m["d_model"], eps, param)
        self.add_module(attn, Attention(m))
        self.add_module(moe, MoE(m, experts))
        if m["dense_ffn_dim"]:
            self.add_module(mlp, DenseMLP(m["d_model"], m["dense_ffn_dim"]))
        self.dense = bool(m["dense_ffn_dim"])
        self.act = (lambda t: F.gelu(t, approximate="tanh")) if m["activation"] == "gelu_tanh" else F.silu

    def forward(self, h, positions, mask):
        attn, moe, _, mlp, _ = self.names
        h = h + self.post_attn_norm(getattr(self, attn)(self.pre_attn_norm(h), positions, mask))
        x = self.pre_moe_norm(h)
        f = getattr(self, moe)(x, self.act)
        if self.dense:  # Grok-2: (moe + mlp) / sqrt(2)
            f = (f + getattr(self, mlp)(x, self.act)) * 2**-0.5
        return h + self.post_moe_norm(f)


class GigafactoryGrokModel(nn.Module):
    def __init__(self, m: dict, names):
        super().__init__()
        self.embed_tokens = nn.Embedding(m["vocab_size"], m["d_model"])
        self.layers = nn.ModuleList(DecoderLayer(m, names) for _ in range(m["n_layers"]))
        self.norm = RMSNorm(m["d_model"], m["norm_eps"], names[4])


class GigafactoryGrokForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GigafactoryGrokConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.m, names = _arch(config)
        if self.m["norm_placement"] != "sandwich":
            raise ValueError("Gigafactory's Grok layouts are sandwich-norm models; export pre-norm models as hf-mixtral")
        self.model = GigafactoryGrokModel(self.m, names)
        # hf-grok1 ties the head to the embedding (no lm_head tensor); sglang-grok always ships an explicit lm_head
        self.lm_head = None if self.m["tie_embeddings"] and names[0] == "attn" else nn.Linear(self.m["d_model"], self.m["vocab_size"], bias=False)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint; nothing to initialise
        pass

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # no KV cache: the whole prefix every step

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        keep = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding does not shift positions
        causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal[None] & keep[:, None, :]) | torch.eye(S, dtype=torch.bool, device=input_ids.device)  # a pad row sees itself
        mask = mask[:, None]  # [B, 1, S, S]
        h = self.model.embed_tokens(input_ids) * self.m["embedding_multiplier"]
        for layer in self.model.layers:
            h = layer(h, positions, mask)
        h = self.model.norm(h)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h * self.m["output_multiplier"], head.to(h.dtype))
        if self.m["final_logit_softcap"]:
            cap = self.m["final_logit_softcap"]
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
