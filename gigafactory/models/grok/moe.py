"""Mixture-of-Experts FFN: an fp32 router and experts computed with grouped GEMMs over expert-sorted tokens.

Shapes in names: T tokens (batch*seq flattened), D d_model, E experts, K top-k, F expert FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from gigafactory.models.config import ModelConfig


def gated_activation(name: str):
    """gelu(tanh approximation) for Grok (jax.nn.gelu's default); silu for Mixtral-style models."""
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


class _AttachAuxLoss(torch.autograd.Function):
    """Returns x unchanged; on backward also sends gradient `scale` into aux_loss.

    This adds the load-balancing loss to the objective without threading it through the model's outputs, so it
    survives pipeline stages, gradient accumulation and torch.compile unchanged (the Megatron/DeepSeek approach).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux_loss, ctx.scale), None


class Router(nn.Module):
    """Linear D->E in fp32, softmax over all experts, top-k; gates are the raw probabilities unless renormalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))  # [E, D]
        self.top_k, self.softcap, self.renormalize = cfg.top_k, cfg.router_softcap, cfg.router_renormalize
        # Added per expert to the selection scores only (DeepSeek-V3 aux-loss-free balancing); zero = plain top-k.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor):
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight.float().t()
        if self.softcap:
            logits_TE = self.softcap * torch.tanh(logits_TE / self.softcap)
        probs_TE = logits_TE.softmax(dim=-1)
        _, experts_TK = torch.topk(probs_TE + self.expert_bias, self.top_k, dim=-1)
        gates_TK = probs_TE.gather(-1, experts_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        return gates_TK, experts_TK, probs_TE, logits_TE


class Experts(nn.Module):
    """E gated FFNs stored as stacked weights, so all experts run as one grouped GEMM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fw = cfg.n_experts, cfg.d_model, cfg.moe_ffn_dim
        self.w_gate = nn.Parameter(torch.empty(E, D, Fw))  # Grok `linear`   [in, out] per expert
        self.w_up = nn.Parameter(torch.empty(E, D, Fw))  # Grok `linear_v`
        self.w_down = nn.Parameter(torch.empty(E, Fw, D))  # Grok `linear_1`
        self.act = gated_activation(cfg.activation)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds tokens sorted by expert; tokens_per_expert_E[e] rows belong to expert e."""
        device = x_ND.device.type
        if torch.is_autocast_enabled(device):  # grouped_mm is not on autocast's op list: cast by hand
            x_ND = x_ND.to(torch.get_autocast_dtype(device))
        # Under tensor parallel the weights are DTensor shards of the F dimension: compute on the local shard.
        w_gate, w_up, w_down = (_local(w).to(x_ND.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if _grouped_mm_ok(x_ND):
            offsets = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
            h_NF = self.act(F.grouped_mm(x_ND, w_gate, offs=offsets)) * F.grouped_mm(x_ND, w_up, offs=offsets)
            return F.grouped_mm(h_NF, w_down, offs=offsets)
        return per_expert_ffn(x_ND, tokens_per_expert_E, w_gate, w_up, w_down, self.act)


def per_expert_ffn(x_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD, act) -> torch.Tensor:
    """The grouped GEMMs' fallback: one matmul chain per expert over its contiguous rows (a loop over experts, never
    over tokens)."""
    outputs, start = [], 0
    for e, count in enumerate(tokens_per_expert_E.tolist()):
        x = x_ND[start : start + count]
        outputs.append((act(x @ w_gate_EDF[e]) * (x @ w_up_EDF[e])) @ w_down_EFD[e])
        start += count
    return torch.cat(outputs)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte-aligned row strides; bf16 on CUDA needs sm90+, CPU handles fp32 and bf16.
    if not hasattr(F, "grouped_mm") or (x.shape[-1] * x.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    if torch.compiler.is_compiling():  # the op's shape function (used while tracing) accepts bf16 only
        return x.dtype == torch.bfloat16
    return x.dtype in (torch.float32, torch.bfloat16)


class MoE(nn.Module):
    """Route each token to top-k experts, run them grouped, and combine with the gate weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.aux_loss_weight, self.z_loss_weight = cfg.aux_loss_weight, cfg.router_z_loss_weight
        self.aux_loss_scale = 1.0  # set by the trainer to 1/grad_accum_steps so aux grads match the main loss
        self.last_aux_loss: torch.Tensor | float = 0.0  # detached, for logging
        self.last_tokens_per_expert: torch.Tensor | None = None  # for logging load balance

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        gates_TK, experts_TK, probs_TE, logits_TE = self.router(x_TD)

        # Sort the T*K (token, expert) pairs by expert so each expert's tokens are contiguous.
        flat_experts = experts_TK.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_pair = order // self.top_k
        tokens_per_expert_E = torch.bincount(flat_experts, minlength=self.n_experts)
        out_ND = self.experts(x_TD[token_of_pair], tokens_per_expert_E)

        # Un-sort back to (token, k) order and take the gate-weighted sum over k (deterministic, unlike index_add_).
        out_TKD = torch.empty_like(out_ND).index_copy_(0, order, out_ND).view(-1, self.top_k, D)
        y_TD = (out_TKD * gates_TK.unsqueeze(-1).to(out_TKD.dtype)).sum(dim=1)

        if self.training and (self.aux_loss_weight or self.z_loss_weight):
            aux = self.balance_loss(probs_TE, tokens_per_expert_E, logits_TE)
            self.last_aux_loss = aux.detach()
            y_TD = _AttachAuxLoss.apply(y_TD, aux, self.aux_loss_scale)
        self.last_tokens_per_expert = tokens_per_expert_E.detach()
        return y_TD.reshape(B, S, D)

    def balance_loss(self, probs_TE, tokens_per_expert_E, logits_TE) -> torch.Tensor:
        """Switch-Transformer load balancing E * sum_e f_e * P_e (1.0 when perfectly balanced), plus z-loss."""
        fraction_E = tokens_per_expert_E.float() / tokens_per_expert_E.sum()
        balance = self.n_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        return self.aux_loss_weight * balance + self.z_loss_weight * z_loss
