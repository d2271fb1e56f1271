"""Mixture-of-Experts FFN: an fp32 router and experts computed with grouped GEMMs over expert-sorted tokens.

Shapes in names: T tokens (batch*seq flattened), D d_model, E experts, K top-k, F expert FFN width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from gigafactory.models.config import ModelConfig


def gated_activation(name: str):
    """gelu(tanh approximation) for Grok (jax.nn.gelu's default); silu for Mixtral-style models."""
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


class _AttachBalanceLoss(torch.autograd.Function):
    """Returns y unchanged; on backward also sends the router losses' gradient into probs_E and z.

    The losses are added to the objective without threading them through the model's outputs, so they survive
    pipeline stages, gradient accumulation and torch.compile unchanged (the Megatron/DeepSeek approach). The balance
    loss aux_w * E * sum_e f_e * P_e has f non-differentiable, so its gradient on P_e is aux_w * E * f_e, with f fixed
    when the forward ran (see BalanceStats). f is kept on ctx, not saved for backward, so activation checkpointing's
    recomputation (which rebuilds saved tensors only; this node's backward is the original forward's) cannot change it.
    """

    @staticmethod
    def forward(ctx, y, probs_E, z, scale: float, aux_weight: float, z_weight: float, fraction_E: torch.Tensor):
        ctx.grad_probs_E = scale * aux_weight * fraction_E.numel() * fraction_E
        ctx.grad_z = scale * z_weight
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        grad_probs_E = ctx.grad_probs_E.to(grad_y.device)
        grad_z = torch.full((), ctx.grad_z, dtype=grad_probs_E.dtype, device=grad_probs_E.device)
        return grad_y, grad_probs_E, grad_z, None, None, None, None


class BalanceStats:
    """The Switch balance loss's f over global microbatches, the same in every layout (Megatron-Core's
    `global_aux_loss`).

    E * sum_e f_e * P_e is not a mean over tokens: computed per rank or per context-parallel chunk it is a different
    loss. So the expert counts behind f are all-reduced over `group` (the ranks holding different tokens of one
    microbatch: dp_replicate, dp_shard, ep, cp; set by parallel/balance.py): every rank sees the global
    microbatch's f. P_e is a mean over tokens, so each rank keeps its local mean and the gradient averaging over those
    ranks (FSDP) makes it the global mean; the z-loss likewise.

    With `accumulate` (several microbatches per optimizer step: pipeline microbatches, gradient accumulation) the
    counts add up over the step's microbatches, and microbatch m's f is that of microbatches 1..m, fixed when m's
    forward runs. Every schedule runs a layer's forwards in microbatch order, so f does not depend on where the
    backwards fall (1f1b, interleaved, zero-bubble, gpipe, accumulation alike); with one microbatch it is the whole
    global batch's f. `reset()` ends a step (parallel/balance.py runs it after backward).
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.group = None
        self.accumulate = False
        self.paused = False  # forwards that are not training tokens (pipeline metadata inference): local, uncounted
        self.step_counts_E: torch.Tensor | None = None

    def reset(self) -> None:
        self.step_counts_E = None

    @torch.compiler.disable  # a collective and Python state; tiny tensors
    def gather(self, counts_E: torch.Tensor, probs_sum_E: torch.Tensor, z_sum: torch.Tensor, n_tokens: int):
        """This forward's global (f, probability sums, z sum, token count), f covering the step's microbatches so
        far: one all-reduce of 2E+2 float64 numbers (exact for counts below 2**53). None for a forward whose tokens
        were already counted or are not training tokens (activation checkpointing's recomputation inside backward,
        pipeline metadata inference); such a forward's f is never used for a gradient."""
        if self.paused or _recomputing():
            return None
        # torch.full, not new_tensor([n_tokens]): a tensor built from host data is a blocking copy (a GPU sync)
        packed = torch.cat([counts_E.double(), probs_sum_E.double(), z_sum.double().reshape(1),
                            torch.full((1,), n_tokens, dtype=torch.float64, device=counts_E.device)])
        if self.group is not None:
            dist.all_reduce(packed, group=self.group)
        E = self.n_experts
        counts_E = packed[:E].round().long()
        if self.accumulate:
            self.step_counts_E = counts_E if self.step_counts_E is None else self.step_counts_E + counts_E
            counts_E = self.step_counts_E
        return fraction_of(counts_E), packed[E : 2 * E], packed[2 * E], packed[2 * E + 1]


def fraction_of(counts_E: torch.Tensor) -> torch.Tensor:
    return counts_E.float() / counts_E.sum()


def _recomputing() -> bool:
    """True inside autograd's backward (where non-reentrant activation checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


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
        # A hook for adapters (posttrain/lora.py): low_rank(name, x_NI, tokens_per_expert_E) -> a term added to the
        # projection `name` (w_gate, w_up, w_down) of those rows, or None. Unset: the plain path below, untouched.
        self.low_rank = None

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds tokens sorted by expert; tokens_per_expert_E[e] rows belong to expert e."""
        device = x_ND.device.type
        if torch.is_autocast_enabled(device):  # grouped_mm is not on autocast's op list: cast by hand
            x_ND = x_ND.to(torch.get_autocast_dtype(device))
        # Under tensor parallel the weights are DTensor shards of the F dimension: compute on the local shard.
        w_gate, w_up, w_down = (_local(w).to(x_ND.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if self.low_rank is not None:
            def project(name, x, w):
                out = grouped_matmul(x, w, tokens_per_expert_E)
                extra = self.low_rank(name, x, tokens_per_expert_E)
                return out if extra is None else out + extra
            return project("w_down", self.act(project("w_gate", x_ND, w_gate)) * project("w_up", x_ND, w_up), w_down)
        if _grouped_mm_ok(x_ND):
            offsets = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
            h_NF = self.act(F.grouped_mm(x_ND, w_gate, offs=offsets)) * F.grouped_mm(x_ND, w_up, offs=offsets)
            return F.grouped_mm(h_NF, w_down, offs=offsets)
        return per_expert_ffn(x_ND, tokens_per_expert_E, w_gate, w_up, w_down, self.act)


def per_expert_ffn(x_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD, act) -> torch.Tensor:
    """The grouped GEMMs' fallback: one matmul chain per expert over its contiguous rows (a loop over experts, never
    over tokens). Reads the counts to the host (row ranges): one sync per layer, which grouped_mm avoids."""
    outputs, start = [], 0
    for e, count in enumerate(tokens_per_expert_E.tolist()):
        x = x_ND[start : start + count]
        outputs.append((act(x @ w_gate_EDF[e]) * (x @ w_up_EDF[e])) @ w_down_EFD[e])
        start += count
    return torch.cat(outputs)


def grouped_matmul(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows times their expert's [in, out] matrix: one grouped GEMM where the shapes allow it (both
    row strides 16-byte aligned), else per_expert_ffn's loop over experts (one host read of the counts)."""
    if _grouped_mm_ok(x_NI) and (w_EIO.shape[-1] * w_EIO.element_size()) % 16 == 0:
        return F.grouped_mm(x_NI, w_EIO, offs=torch.cumsum(tokens_per_expert_E, 0).to(torch.int32))
    rows = x_NI.split(tokens_per_expert_E.tolist())
    return torch.cat([r @ w_EIO[e] for e, r in enumerate(rows)])


def tokens_per_expert(flat_experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Pairs routed to each expert, counted on the device. Not torch.bincount: on CUDA it reads the largest index
    back to size its output (a host sync in every MoE layer); the size here is known, E."""
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_experts.device)
    return counts_E.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))


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
        self.balance = BalanceStats(cfg.n_experts)  # global statistics; parallel/balance.py sets group, accumulate
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
        tokens_per_expert_E = tokens_per_expert(flat_experts, self.n_experts)
        out_ND = self.experts(x_TD[token_of_pair], tokens_per_expert_E)

        # Un-sort back to (token, k) order and take the gate-weighted sum over k (deterministic, unlike index_add_).
        out_TKD = torch.empty_like(out_ND).index_copy_(0, order, out_ND).view(-1, self.top_k, D)
        y_TD = (out_TKD * gates_TK.unsqueeze(-1).to(out_TKD.dtype)).sum(dim=1)

        if self.training and (self.aux_loss_weight or self.z_loss_weight):
            y_TD = self._attach_router_losses(y_TD, probs_TE, logits_TE, tokens_per_expert_E)
        self.last_tokens_per_expert = tokens_per_expert_E.detach()
        return y_TD.reshape(B, S, D)

    @torch.compiler.disable  # a collective, Python state; tiny tensors
    def _attach_router_losses(self, y_TD, probs_TE, logits_TE, tokens_per_expert_E) -> torch.Tensor:
        """Attach the balance and z losses' gradients to y; log their global value (see BalanceStats)."""
        probs_E = probs_TE.mean(dim=0)  # this rank's mean; the gradient averaging over data ranks makes it global
        if self.z_loss_weight:
            lse_sq_T = torch.logsumexp(logits_TE, dim=-1).square()
            z, z_sum = lse_sq_T.mean(), lse_sq_T.detach().sum()
        else:
            z = z_sum = probs_E.new_zeros(())
        stats = self.balance.gather(tokens_per_expert_E, probs_TE.detach().sum(dim=0), z_sum, probs_TE.shape[0])
        if stats is None:  # not a training forward whose gradient counts: local f, nothing logged
            fraction_E = fraction_of(tokens_per_expert_E)
        else:
            fraction_E, probs_sum_E, z_sum, n_tokens = stats
            self.last_aux_loss = self.router_losses(fraction_E, (probs_sum_E / n_tokens).float(), (z_sum / n_tokens).float())
        return _AttachBalanceLoss.apply(y_TD, probs_E, z, self.aux_loss_scale, self.aux_loss_weight,
                                        self.z_loss_weight, fraction_E)

    def router_losses(self, fraction_E: torch.Tensor, probs_E: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing E * sum_e f_e * P_e (1.0 when perfectly balanced), plus the z-loss
        (mean squared logsumexp of the router logits), weighted."""
        return self.aux_loss_weight * self.n_experts * (fraction_E * probs_E).sum() + self.z_loss_weight * z
