"""Sequence parallel on top of tensor parallel (Megatron-style): between the TP regions, each TP rank keeps only its
S/tp slice of the sequence, so norms, residual adds and the output head run on a slice and activations take 1/tp of
the memory.

    embed -> [slice]  norm  -> all-gather -> attention (TP) -> reduce-scatter -> norm + residual
                      norm  -> all-gather -> MoE (experts TP) -> reduce-scatter -> norm + residual ... head on the slice

Each TP rank's loss covers its slice, so the trainer scales the loss by 1/tp and sums the gradients of the
replicated (non-TP) parameters over the TP group after backward (ReplicatedGradSync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleInputOutput, parallelize_module

from gigafactory.parallel.distributed import sum_grads


class _SliceSequence(torch.autograd.Function):
    """Keep this rank's contiguous slice of dim 1. Backward returns only this slice's gradient (zeros elsewhere):
    the embedding's gradient is then partial per rank and summed by ReplicatedGradSync like every replicated one."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.size, ctx.full = dist.get_rank(group), dist.get_world_size(group), x.shape[1]
        return x.chunk(ctx.size, dim=1)[ctx.rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(grad.shape[0], ctx.full, *grad.shape[2:])
        full.chunk(ctx.size, dim=1)[ctx.rank].copy_(grad)
        return full, None


def slice_sequence(x: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The slice of dim 1 this TP rank owns (for targets; no gradient)."""
    return x.chunk(tp, dim=1)[tp_rank]


def apply_sp(model: nn.Module, tp_mesh, copy_to_tp) -> None:
    """Called by apply_tp (with attention's wo already reduce-scattering): re-lay block inputs as sequence shards."""
    group = tp_mesh.get_group()
    model.embed.register_forward_hook(lambda mod, args, out: _SliceSequence.apply(out, group))
    for block in model.layers.values():
        # attention(x, cos, sin, positions, cache, block_mask): x arrives as a sequence shard and is gathered
        parallelize_module(block.attn, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),) + (None,) * 5, desired_input_layouts=(Replicate(),) + (None,) * 5))
        # MoE: gather the tokens, route them on every rank, experts add partial sums, reduce-scatter the result.
        # The router's input gradient is partial too (its gates multiply partial expert outputs), hence the all-reduce.
        parallelize_module(block.moe, tp_mesh, PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Partial(),), desired_output_layouts=(Shard(1),)))
        block.moe.register_forward_pre_hook(lambda mod, args: (copy_to_tp(args[0], group), *args[1:]))


def replicated_param_names(model: nn.Module) -> list[str]:
    """After TP, before FSDP: parameters every TP rank holds whole (embedding, norms, router), partial under SP."""
    return [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]


class ReplicatedGradSync:
    """Sum the gradients of replicated parameters over the TP group (each rank saw only its sequence slice)."""

    def __init__(self, params: list[torch.Tensor], group):
        self.params, self.group = params, group

    def __call__(self) -> None:
        sum_grads(self.params, self.group)
