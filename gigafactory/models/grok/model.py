"""The Grok decoder, written for one device; parallelism is applied from outside (gigafactory/parallel).

Grok-1 as released by xAI: sandwich RMSNorms, GQA with NeoX rotary embeddings, tanh-capped attention logits,
scaled tied embeddings, and a top-2 MoE of gated-GELU experts. Variants (Grok-2, Mixtral-style) are config fields.
Shapes: B batch, S sequence, D d_model, H query heads, G kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from gigafactory.models.config import ModelConfig
from gigafactory.models.grok.head_loss import IGNORE_INDEX, head_cross_entropy
from gigafactory.models.grok.moe import MoE, gated_activation
from gigafactory.models.grok.paged import PagedLayer, PagedStep

# The attributes under which activation checkpointing and torch.compile hold the module they wrap.
WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_PREFIX = re.compile(rf"({'|'.join(WRAPPER_ATTRS)})\.")


def plain_name(name: str) -> str:
    """A parameter or module name without the activation-checkpoint and torch.compile wrappers' prefixes: the name
    the single-device model gives it, so seeds and targets do not depend on how the model was wrapped."""
    return _WRAPPER_PREFIX.sub("", name)


def copy_global_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (global) tensor into a parameter that may be a DTensor shard (FSDP/TP): each rank takes its slice."""
    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    param.to_local().copy_(local.reshape(param.to_local().shape))


class RMSNorm(nn.Module):
    """y = scale * x / rms(x), computed in fp32 (scale used as is, not 1 + scale)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def rope_cos_sin(positions_BS: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables [B, S, Dh] for the NeoX half-split rotation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BS.device, dtype=torch.float32) / head_dim))
    angles = positions_BS.float().unsqueeze(-1) * inv_freq  # [B, S, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSD.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x_BHSD.float() * cos_BSD.unsqueeze(1) + rotated * sin_BSD.unsqueeze(1)
    return out.to(x_BHSD.dtype)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fused (and memory-light) when compiled; compile it once per process."""
    return torch.compile(flex_attention)


def causal_block_mask(positions_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> BlockMask:
    """FlexAttention's sparse mask for 'key position <= query position' (absolute positions, per row), and with
    document ids also 'same document' (packed conversations never see each other)."""
    B, S = positions_BS.shape
    if doc_ids_BS is None:
        mask_mod = lambda b, h, q, k: positions_BS[b, k] <= positions_BS[b, q]  # noqa: E731
    else:
        mask_mod = lambda b, h, q, k: (positions_BS[b, k] <= positions_BS[b, q]) & (doc_ids_BS[b, k] == doc_ids_BS[b, q])  # noqa: E731
    return create_block_mask(mask_mod, B, None, S, S, device=positions_BS.device)


def use_flex(cfg: ModelConfig, device: torch.device) -> bool:
    return bool(cfg.attn_softcap) and (cfg.attn_impl == "flex" or (cfg.attn_impl == "auto" and device.type == "cuda"))


@dataclass
class KVCache:
    """Per-layer key/value buffers [B, G, max_len, Dh]; each row (sequence slot) writes at its own positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
        make = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return cls([make() for _ in range(cfg.n_layers)], [make() for _ in range(cfg.n_layers)])

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.scale, self.softcap = cfg.resolved_attn_scale, cfg.attn_softcap
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.kv_gather = None  # set by gigafactory/parallel/context_parallel.py

    def forward(self, x_BSD, cos, sin, positions_BS, cache_kv=None, block_mask: BlockMask | None = None, doc_ids_BS=None):
        """block_mask (from causal_block_mask) selects the fused FlexAttention path for capped logits. doc_ids_BS
        (packed documents, eager path) restricts attention to the query's own document."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        # Heads are local here (tensor parallel shards them), so count them from the projected widths.
        n_heads, n_kv = q.shape[-1] // self.head_dim, k.shape[-1] // self.head_dim
        q = q.view(B, S, n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(B, S, n_kv, self.head_dim).transpose(1, 2)  # [B, G, S, Dh]
        v = v.view(B, S, n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if block_mask is not None:  # GrokModel passes one only without a KV cache or context parallel
            out = self._attend_flex(q, k, v, block_mask)
        else:
            out = self._attend(q, k, v, positions_BS, cache_kv, doc_ids_BS)
        return self.wo(out.transpose(1, 2).reshape(B, S, n_heads * self.head_dim))

    def _attend_flex(self, q_BHSD, k_BGSD, v_BGSD, block_mask: BlockMask) -> torch.Tensor:
        """Capped attention fused by FlexAttention: the [S, K] logits never reach memory."""
        cap = self.softcap
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()  # inside compile()
        return flex(q_BHSD, k_BGSD, v_BGSD, score_mod=lambda score, b, h, q_idx, k_idx: cap * torch.tanh(score / cap),
                    block_mask=block_mask, scale=self.scale, enable_gqa=q_BHSD.shape[1] != k_BGSD.shape[1])

    def _attend(self, q, k, v, positions_BS, cache_kv, doc_ids_BS=None) -> torch.Tensor:
        """Attention with an explicit mask on absolute positions (KV cache, context parallel, CPU): [B, H, S, Dh]."""
        if isinstance(cache_kv, PagedLayer):  # serving: keys/values in a block pool (paged.py)
            return cache_kv.attend(q, k, v, self._masked_attention)
        B, _, S, _ = q.shape
        n_kv = k.shape[1]
        key_docs_BK = doc_ids_BS
        if cache_kv is None:
            key_pos_BK = positions_BS
            if self.kv_gather is not None:  # context parallel: keys/values of the whole sequence
                k, v, key_pos_BK = self.kv_gather(k, v, positions_BS)
                if doc_ids_BS is not None:  # and their documents, gathered as their positions are
                    key_docs_BK = self.kv_gather.gather_ids(doc_ids_BS)
        else:  # write this step's keys/values at each row's positions, then attend over the whole buffer
            cache_k, cache_v = cache_kv
            index = positions_BS[:, None, :, None].expand(B, n_kv, S, self.head_dim)
            cache_k.scatter_(2, index, k.to(cache_k.dtype))
            cache_v.scatter_(2, index, v.to(cache_v.dtype))
            k, v = cache_k.to(q.dtype), cache_v.to(q.dtype)
            key_pos_BK = torch.arange(k.shape[2], device=k.device).expand(B, -1)
        mask_BSK = key_pos_BK[:, None, :] <= positions_BS[:, :, None]  # causal on absolute positions
        if doc_ids_BS is not None:  # packed documents: keys of the query's own document only
            if cache_kv is not None:
                raise ValueError("document-masked attention needs the whole sequence's keys (no KV cache)")
            mask_BSK = mask_BSK & (key_docs_BK[:, None, :] == doc_ids_BS[:, :, None])
        return self._masked_attention(q, k, v, mask_BSK)

    def _masked_attention(self, q, k, v, mask_BSK) -> torch.Tensor:
        """q [B, H, S, Dh] over k, v [B, G, K, Dh] where mask_BSK is True: [B, H, S, Dh]."""
        B, n_heads, S, _ = q.shape
        n_kv = k.shape[1]
        if not self.softcap:  # no cap: the fused kernel is exact and faster
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask_BSK[:, None], scale=self.scale, enable_gqa=n_heads != n_kv
            )
        # Grok: logits = cap * tanh(scale * q.k / cap), masked, softmax in fp32
        group = n_heads // n_kv  # query head h uses kv head h // group
        qg = q.view(B, n_kv, group, S, self.head_dim) * (self.scale / self.softcap)  # fold scale and 1/cap into q
        logits = self.softcap * torch.tanh((qg @ k.unsqueeze(2).transpose(-1, -2)).float())  # [B, G, group, S, K]
        logits = logits.masked_fill(~mask_BSK[:, None, None], float("-inf"))
        probs = logits.softmax(dim=-1).to(v.dtype)
        return (probs @ v.unsqueeze(2)).view(B, n_heads, S, self.head_dim)


class DenseFFN(nn.Module):
    """Gated FFN act(x W) * (x V) W_out; Grok-2 runs one beside the experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.dense_ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.dense_ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.dense_ffn_dim, cfg.d_model, bias=False)
        self.act = gated_activation(cfg.activation)

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.sandwich = cfg.norm_placement == "sandwich"
        self.pre_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.pre_moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg)
        self.dense = DenseFFN(cfg) if cfg.dense_ffn_dim else None
        if self.sandwich:
            self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.post_moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h, cos, sin, positions, cache_kv=None, block_mask=None, doc_ids=None, keep_rows=None):
        # doc_ids as a keyword: sequence parallel's input layouts cover the six positional arguments
        a = self.attn(self.pre_attn_norm(h), cos, sin, positions, cache_kv, block_mask, doc_ids_BS=doc_ids)
        h = h + (self.post_attn_norm(a) if self.sandwich else a)
        if keep_rows is not None:  # serving's last layer: every token's key/value is written, only sampled ones go on
            h = h[:, keep_rows]
        m = self.pre_moe_norm(h)
        f = self.moe(m)
        if self.dense is not None:  # Grok-2: (moe + mlp) / sqrt(2)
            f = (f + self.dense(m)) * 2**-0.5
        return h + (self.post_moe_norm(f) if self.sandwich else f)


class GrokModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})  # PP deletes some
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.context_parallel = False  # set by gigafactory/parallel/context_parallel.py (attention then runs eager)

    def forward(self, tokens_BS: torch.Tensor, positions_BS: torch.Tensor | None = None,
                kv_cache: KVCache | PagedStep | None = None, targets_BS: torch.Tensor | None = None,
                doc_ids_BS: torch.Tensor | None = None):
        """Logits [B, S, V]. Without a cache, positions default to 0..S-1; with one, pass each row's positions.
        With targets, the mean cross-entropy over targets != IGNORE_INDEX instead: on CPUs fused with the head, chunk
        by chunk (head_loss.py). doc_ids_BS (packed documents, e.g. SFT conversations): attention stays within a
        document; give each document positions from 0 to make its tokens see exactly what they would alone.

        A pipeline stage (gigafactory/parallel/pipeline.py) holds some of the layers: after the first stage the input
        is hidden states [B, S, D] (floating point), and before the last stage (norm is None) it returns them."""
        h = tokens_BS if tokens_BS.is_floating_point() else self.embed(tokens_BS) * self.cfg.embedding_multiplier
        B, S = h.shape[:2]
        if positions_BS is None:
            positions_BS = torch.arange(S, device=h.device).expand(B, S)
        cos, sin = rope_cos_sin(positions_BS, self.cfg.resolved_head_dim, self.cfg.rope_theta)
        flex = kv_cache is None and not self.context_parallel and use_flex(self.cfg, h.device)
        block_mask = causal_block_mask(positions_BS, doc_ids_BS) if flex else None
        # Serving samples from a few tokens of the step (each prompt's last, each decode): the last layer's experts and
        # everything after run on those rows only (for a prompt chunk that is 1/n_layers of its work saved).
        logit_rows = kv_cache.logit_rows if isinstance(kv_cache, PagedStep) and self.norm is not None else None
        last = next(reversed(self.layers.keys()), None)
        for i, layer in self.layers.items():
            cache_kv = None if kv_cache is None else kv_cache.layer(int(i))
            h = layer(h, cos, sin, positions_BS, cache_kv, block_mask, doc_ids=None if flex else doc_ids_BS,
                      keep_rows=logit_rows if i == last else None)
        if self.norm is None:
            return h
        if logit_rows is not None and last is None:
            h = h[:, logit_rows]
        h = self.norm(h)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if targets_BS is not None and not h.is_cuda:
            return head_cross_entropy(h.flatten(0, 1), head, targets_BS.flatten(), self.cfg.output_multiplier,
                                      self.cfg.final_logit_softcap)
        # (h * m) W^T == (h W^T) * m: scaling the [B, S, D] input is a V/D-times smaller pass than scaling the logits.
        if isinstance(kv_cache, PagedStep) and self.lm_head is not None:  # serving: the module, which the engine may prepack
            logits = self.lm_head(h * self.cfg.output_multiplier)
        else:
            logits = F.linear(h * self.cfg.output_multiplier, head.to(h.dtype))
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets_BS is not None:  # CUDA: whole logits (measured 6x faster there than 128-token chunks)
            targets = targets_BS.flatten()  # a mean over the kept targets, 0 (not NaN) when none is kept, as on CPU
            total = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return logits

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init, usable after building on the meta device and calling to_empty()."""
        self.reset_buffers()
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                copy_global_into(p, torch.ones(p.shape, dtype=p.dtype))
            else:  # one generator per parameter name: the same weights whatever device, layout or stage holds it
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(plain_name(name).encode()))
                full = torch.empty(p.shape, dtype=p.dtype).normal_(0.0, self.cfg.init_std, generator=gen)
                copy_global_into(p, full)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero the non-persistent buffers (router expert bias): to_empty() leaves them as garbage, and checkpoints
        do not carry them, so every path that materialises a meta model must call this."""
        for buffer in self.buffers():
            buffer.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]
