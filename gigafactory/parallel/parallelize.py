"""Apply parallelisms to a GrokModel built on the meta device, in one fixed order:

    tensor parallel (attention heads, expert FFN width)  ->  activation checkpointing  ->  torch.compile per block
    ->  FSDP2 / HSDP over the data-parallel axes

The model code stays single-device; everything distributed is attached here from outside.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from gigafactory.models import GrokModel
from gigafactory.parallel.dims import ParallelDims


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient over the TP group backward (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce of partial sums forward; identity backward (Megatron's `g`)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard_experts_tp(experts: nn.Module, tp_mesh) -> None:
    """Split every expert's FFN width F over the TP axis: w_gate/w_up by columns, w_down by rows."""
    for name, dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        param = getattr(experts, name)
        experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(dim)])))
    group = tp_mesh.get_group()
    experts.register_forward_pre_hook(lambda mod, args: (_CopyToTP.apply(args[0], group), *args[1:]))
    experts.register_forward_hook(lambda mod, args, out: _ReduceFromTP.apply(out, group))


def apply_tp(model: GrokModel, tp_mesh) -> None:
    """Attention heads split column-/row-wise (DTensor), experts split along F; embeddings and norms replicated."""
    for block in model.layers.values():
        parallelize_module(
            block.attn, tp_mesh,
            {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(), "wo": RowwiseParallel()},
        )
        shard_experts_tp(block.moe.experts, tp_mesh)
        if block.dense is not None:
            parallelize_module(block.dense, tp_mesh, {"w_gate": ColwiseParallel(), "w_up": ColwiseParallel(), "w_down": RowwiseParallel()})


def apply_activation_checkpointing(model: GrokModel, mode: str) -> None:
    """full: recompute each block in backward; selective: recompute only the attention sublayer."""
    for name, block in list(model.layers.items()):
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            block.attn = checkpoint_wrapper(block.attn, preserve_rng_state=False)


def apply_compile(model: GrokModel) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block)


def apply_fsdp(model: GrokModel, dp_mesh, param_dtype: torch.dtype) -> None:
    """FSDP2 on each block then the root; a 2-D (replicate, shard) mesh gives HSDP. Gradients reduce in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def parallelize(model: GrokModel, dims: ParallelDims, mesh, *, param_dtype: torch.dtype, activation_checkpointing: str, compile: bool) -> GrokModel:
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        dp_axes = tuple(a for a in ("dp_replicate", "dp_shard") if dims.degrees[a] > 1)
        apply_fsdp(model, mesh[dp_axes], param_dtype)
    return model
