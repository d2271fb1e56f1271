"""Apply parallelisms to a GrokModel built on the meta device, in one fixed order:

    tensor (+ sequence) parallel  ->  expert parallel  ->  context parallel  ->  activation checkpointing
    ->  torch.compile per block
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
from gigafactory.models.grok.model import WRAPPER_ATTRS
from gigafactory.parallel.context_parallel import apply_cp
from gigafactory.parallel.dims import ParallelDims
from gigafactory.parallel.expert_parallel import apply_ep
from gigafactory.parallel.sequence_parallel import apply_sp, replicated_param_names


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


def shard_experts_tp(experts: nn.Module, tp_mesh, reduce_here: bool) -> None:
    """Split every expert's FFN width F over the TP axis: w_gate/w_up by columns, w_down by rows. Without sequence
    parallel the experts all-reduce their partial sums themselves; with it the MoE's reduce-scatter does."""
    for name, dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        param = getattr(experts, name)
        experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(dim)])))
    if reduce_here:
        group = tp_mesh.get_group()
        experts.register_forward_pre_hook(lambda mod, args: (_CopyToTP.apply(args[0], group), *args[1:]))
        experts.register_forward_hook(lambda mod, args, out: _ReduceFromTP.apply(out, group))


def apply_tp(model: GrokModel, tp_mesh, sequence_parallel: bool) -> None:
    """Attention heads split column-/row-wise (DTensor), experts split along F; embeddings, norms and the router
    replicated. With sequence parallel, activations between those regions are split along the sequence."""
    for block in model.layers.values():
        wo = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
        parallelize_module(block.attn, tp_mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(), "wo": wo})
        shard_experts_tp(block.moe.experts, tp_mesh, reduce_here=not sequence_parallel)
        if block.dense is not None:
            parallelize_module(block.dense, tp_mesh, {"w_gate": ColwiseParallel(), "w_up": ColwiseParallel(), "w_down": RowwiseParallel()})
    if sequence_parallel:
        apply_sp(model, tp_mesh, _CopyToTP.apply)
        model.sp_replicated_names = replicated_param_names(model)


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


def apply_fsdp(model: GrokModel, dp_mesh, param_dtype: torch.dtype, ignored: set | None = None) -> None:
    """FSDP2 on each block then the root; a 2-D (replicate, shard) mesh gives HSDP. Gradients reduce in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)


def _data_mesh(mesh, dims: ParallelDims, axes: tuple[str, ...], name: str):
    """The (replicate, shard) mesh FSDP uses: `axes` flattened into one shard axis, dp_replicate kept apart for HSDP."""
    live = [a for a in axes if dims.degrees[a] > 1]
    if len(live) > 1:
        try:  # flatten once per mesh; later calls find the named axis
            mesh[name]
        except KeyError:
            mesh[tuple(live)]._flatten(name)
        shard_axis = name
    else:
        shard_axis = live[0] if live else "dp_shard"  # size 1: plain replication (DDP-like) under HSDP
    return mesh["dp_replicate", shard_axis] if dims.dp_replicate > 1 else mesh[shard_axis]


def parallelize(model: GrokModel, dims: ParallelDims, mesh, *, param_dtype: torch.dtype, activation_checkpointing: str,
                compile: bool, sequence_parallel: bool = False) -> GrokModel:
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], sequence_parallel)
    if dims.ep > 1:
        for block in model.layers.values():
            apply_ep(block.moe.experts, mesh["ep"])
    if dims.cp > 1:
        apply_cp(model, mesh["cp"])
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    # Every rank that sees different tokens (dp_replicate, dp_shard, ep, cp) must average gradients: FSDP does it.
    data_degree = dims.dp_replicate * dims.dp_shard * dims.ep * dims.cp
    if data_degree > 1:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        ignored: set = set()
        if dims.ep > 1:  # experts are already split over ep: shard them over the other data axes only
            expert_degree = dims.dp_replicate * dims.dp_shard * dims.cp
            for block in model.layers.values():
                experts = _unwrap(block).moe.experts
                # FSDP averages expert grads over the other data axes; build.py divides them by ep afterwards
                # (set_gradient_divide_factor would do both at once, but needs PREMUL_SUM, which gloo lacks).
                if expert_degree > 1:
                    fully_shard(experts, mesh=_data_mesh(mesh, dims, ("dp_shard", "cp"), "dp_shard_cp"), mp_policy=policy)
                else:  # nothing to reduce over: each ep rank owns its experts outright
                    ignored.update(experts.parameters())
        apply_fsdp(model, _data_mesh(mesh, dims, ("dp_shard", "ep", "cp"), "dp_shard_ep_cp"), param_dtype, ignored or None)
    return model


def _unwrap(block: nn.Module) -> nn.Module:
    """The Block inside activation-checkpoint or compile wrappers."""
    for attr in WRAPPER_ATTRS:
        block = getattr(block, attr, block)
    return block
