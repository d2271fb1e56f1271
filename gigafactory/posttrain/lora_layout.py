"""Where LoRA's adapter factors live in a parallel layout, and the collectives that make their gradients, gradient
norm and merged deltas those of one process (posttrain/lora.py says which factor is sharded how, and why).

A factor is described by its `shards`: (dim, mesh axis) pairs along which this rank holds a chunk of the whole
factor (torch.chunk, as DTensor's Shard does); on every other axis it is replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from gigafactory.train.optim import clip_scale

AXES = ("pp", "dp_replicate", "dp_shard", "ep", "cp", "tp")
DATA_AXES = ("dp_replicate", "dp_shard", "ep", "cp")  # ranks that see different tokens: FSDP averages over these


@dataclass
class Factor:
    """One adapter parameter: its shards, whether its gradient is partial over tp, whether it is an expert's."""

    param: nn.Parameter
    shards: tuple[tuple[int, str], ...]
    partial_over_tp: bool
    experts: bool


class Layout:
    """The trainer's DeviceMesh as LoRA needs it (mesh None: one process, every method a no-op or a local op)."""

    def __init__(self, mesh, sequence_parallel: bool = False):
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.degrees = {axis: mesh[axis].size() for axis in AXES} if mesh is not None else {}
        self.world = math.prod(self.degrees.values()) if self.degrees else 1
        # Built now, on every rank alike (creating a group is collective): the averaging groups, expert and not.
        self.data_group = self._group(DATA_AXES)
        self.expert_data_group = self._group(tuple(a for a in DATA_AXES if a != "ep")) if self.degree("ep") > 1 else self.data_group
        self.data_degree = math.prod(self.degree(a) for a in DATA_AXES)

    def degree(self, axis: str) -> int:
        return self.degrees.get(axis, 1)

    def group(self, axis: str):
        return self.mesh[axis].get_group()

    def _group(self, axes: tuple[str, ...]):
        live = [a for a in axes if self.degree(a) > 1]
        if not live:
            return None
        if len(live) == 1:
            return self.group(live[0])
        return self.mesh[tuple(live)]._flatten("lora_" + "_".join(live)).get_group()  # the same group if flattened before

    @staticmethod
    def shard_dim(weight: torch.Tensor, axis: str) -> int | None:
        """The dim of `weight` that mesh axis `axis` shards (tp: column/row parallel; ep: experts), or None."""
        if not isinstance(weight, DTensor) or axis not in (weight.device_mesh.mesh_dim_names or ()):
            return None
        placement = weight.placements[weight.device_mesh.mesh_dim_names.index(axis)]
        return placement.dim % weight.ndim if placement.is_shard() else None

    def slice(self, whole: torch.Tensor, shards) -> torch.Tensor:
        """This rank's chunk of a factor drawn whole."""
        for dim, axis in shards:
            whole = whole.chunk(self.degree(axis), dim)[self.mesh[axis].get_local_rank()]
        return whole.contiguous()

    def gather(self, local: torch.Tensor, shards) -> torch.Tensor:
        """The whole factor from every rank's chunk (collective over the shard axes)."""
        for dim, axis in reversed(shards):
            parts = [torch.empty_like(local) for _ in range(self.degree(axis))]
            dist.all_gather(parts, local.contiguous(), group=self.group(axis))
            local = torch.cat(parts, dim)
        return local

    # ---- gradients ---------------------------------------------------------------------------------------------
    def sync_grads(self, factors: list[Factor], microbatches: int = 1) -> None:
        """Sum the tp-partial gradients over tp, then average every gradient over the data ranks (expert factors:
        summed over the non-ep data ranks, divided by all of them) and over `microbatches` (a pipeline schedule
        divides its stages' gradients by its microbatch count; the adapters are not in a stage). A factor with no
        gradient gets zeros, so every rank flattens the same list."""
        for f in factors:
            if f.param.grad is None:
                f.param.grad = torch.zeros_like(f.param)
        divisor = self.data_degree * microbatches
        if self.world == 1:
            for f in factors if divisor > 1 else ():
                f.param.grad.div_(divisor)
            return
        if self.degree("tp") > 1:
            _all_reduce_sum([f.param.grad for f in factors if f.partial_over_tp], self.group("tp"))
        for experts, group in ((False, self.data_group), (True, self.expert_data_group)):
            grads = [f.param.grad for f in factors if f.experts == experts]
            if group is not None:
                _all_reduce_sum(grads, group)
            if divisor > 1:
                for g in grads:
                    g.div_(divisor)

    def clip_grads(self, factors: list[Factor], max_norm: float) -> torch.Tensor:
        """The global gradient norm of the whole adapters (each element counted once, whatever its copies), clipped
        to max_norm if > 0; a 0-dim device tensor (train/optim.clip_grad_norm_'s numbers on one process)."""
        squares = []
        for f in factors:
            sq = torch.linalg.vector_norm(f.param.grad, dtype=torch.float32) ** 2
            if self.world > 1:  # this chunk is held by world / (pp * shards) ranks alike
                sq = sq * (self.degree("pp") * math.prod(self.degree(axis) for _, axis in f.shards) / self.world)
            squares.append(sq)
        total_sq = torch.stack(squares).sum()
        if self.world > 1:
            dist.all_reduce(total_sq)
        total = total_sq.sqrt()
        if max_norm > 0:
            scale = clip_scale(total, max_norm)
            for f in factors:
                g = f.param.grad
                g.mul_(scale) if g.dtype == torch.float32 else g.copy_(g.float() * scale)
        return total


def local_piece(whole: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The part of a whole-weight-shaped tensor that this rank's `weight` (a DTensor in any layout: TP, EP, FSDP or
    several) holds locally."""
    if not isinstance(weight, DTensor):
        return whole
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


class _SumOverTP(torch.autograd.Function):
    """A row-parallel linear's A x is a partial sum over tp: sum it (forward). Without sequence parallel every tp
    rank then computes the same thing and its gradient passes through (Megatron's g); with it, each rank keeps its
    sequence slice, and the backward sums the ranks' zero-padded slice gradients (an all-gather)."""

    @staticmethod
    def forward(ctx, h, group, sequence_parallel: bool):
        h = h.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(h, group=group)
        ctx.group, ctx.sp = group, sequence_parallel
        if not sequence_parallel:
            return h
        ctx.rank, ctx.size, ctx.full = dist.get_rank(group), dist.get_world_size(group), h.shape[1]
        return h.chunk(ctx.size, dim=1)[ctx.rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.sp:
            return grad, None, None
        full = grad.new_zeros(grad.shape[0], ctx.full, *grad.shape[2:])
        full.chunk(ctx.size, dim=1)[ctx.rank].copy_(grad)
        dist.all_reduce(full, group=ctx.group)
        return full, None, None


def sum_over_tp(h: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    return _SumOverTP.apply(h, group, sequence_parallel)
