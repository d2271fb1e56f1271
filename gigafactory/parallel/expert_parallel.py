"""Expert parallel: each rank of the `ep` axis owns n_experts / ep experts; tokens travel to them by all-to-all.

The Experts module receives tokens already sorted by global expert id (see models/grok/moe.py). A forward pre-hook
sends each rank the tokens of its experts (uneven splits, `all_to_all_single`) and regroups them by local expert; a
forward hook undoes the regrouping and sends the results back. The model code never knows.
Shapes: N routed (token, expert) pairs on this rank, R pairs received, E global experts, El = E / ep local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0 (the backward is the reverse exchange)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def apply_ep(experts: nn.Module, ep_mesh) -> None:
    """Shard the stacked expert weights along the expert dimension and route tokens with all-to-all."""
    ep = ep_mesh.size()
    group = ep_mesh.get_group()
    for name in ("w_gate", "w_up", "w_down"):
        param = getattr(experts, name)
        experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, ep_mesh, [Shard(0)])))
    state: dict = {}

    def dispatch(module, args):
        x_ND, tokens_per_expert_E = args
        n_local = tokens_per_expert_E.numel() // ep
        # counts_from[r, e]: pairs rank r sends to this rank's local expert e
        counts_from = torch.empty_like(tokens_per_expert_E)
        dist.all_to_all_single(counts_from, tokens_per_expert_E, group=group)
        counts_from = counts_from.view(ep, n_local)
        # The split sizes must be host lists (all_to_all_single's contract): one read per MoE layer, inherent to
        # uneven all-to-all; both lists come back in a single transfer.
        splits = torch.stack([tokens_per_expert_E.view(ep, n_local).sum(1), counts_from.sum(1)]).tolist()
        send_splits, recv_splits = splits
        received_RD = _all_to_all(x_ND, recv_splits, send_splits, group)
        # received rows are ordered (source rank, local expert); the grouped GEMM needs (local expert, ...).
        # output_size (known from the splits) spares repeat_interleave its own read of the counts' sum.
        expert_ids = torch.arange(n_local, device=x_ND.device).repeat(ep)
        local_expert_of_row = torch.repeat_interleave(expert_ids, counts_from.flatten(), output_size=sum(recv_splits))
        order = torch.argsort(local_expert_of_row, stable=True)
        state.update(order=order, send_splits=send_splits, recv_splits=recv_splits)
        return received_RD[order], counts_from.sum(0)

    def combine(module, args, out_RD):
        unsorted = torch.empty_like(out_RD).index_copy_(0, state["order"], out_RD)
        return _all_to_all(unsorted, state["send_splits"], state["recv_splits"], group)

    experts.register_forward_pre_hook(dispatch)
    experts.register_forward_hook(combine)


class ExpertGradScale:
    """Expert grads sum the losses of the ep ranks that sent them tokens, and FSDP (if any) averages over the other
    data axes only: dividing by ep after backward gives the gradient of the global-mean loss. (A hook on the
    parameters would not survive `to_empty`, which replaces DTensor parameters.)"""

    def __init__(self, experts: list[nn.Module], factor: float):
        self.experts, self.factor = experts, factor

    def __call__(self) -> None:
        for module in self.experts:
            for param in module.parameters():
                if param.grad is not None:
                    param.grad.mul_(self.factor)
