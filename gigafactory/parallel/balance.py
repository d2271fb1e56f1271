"""The router balance loss's statistics, the same in every layout (models/grok/moe.py BalanceStats).

Two things make a layout's balance loss equal one process's with the same number of microbatches per step:
- the expert counts of a microbatch are all-reduced over the ranks routing different tokens of it (data and context
  axes), and added up over the step's microbatches in forward order (`setup_balance_stats`);
- a global microbatch is the same tokens in every layout: chunk m of the step's global batch, as gradient
  accumulation reads it. The loader gives data rank r the contiguous rows r*b .. (r+1)*b-1 of the global batch, and
  a pipeline schedule splits those rows into its microbatches, so under pp x dp the union of the ranks' microbatch m
  would be a strided set instead. `GlobalMicrobatchSchedule` exchanges the token ids (one all-to-all of the step's
  int64 inputs or targets, a few hundred kB, against megabytes of activations) so that rank r's microbatch m is its
  share of chunk m.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gigafactory.config.job import JobConfig
from gigafactory.parallel.dims import ParallelDims

DATA_AXES = ("dp_replicate", "dp_shard", "ep")  # the ranks that read different rows (ParallelDims.dp)


def _flat_group(mesh, dims: ParallelDims, axes: tuple[str, ...]):
    """The process group over the live `axes` of the mesh (flattened once per mesh); None if every one has size 1."""
    live = tuple(axis for axis in axes if dims.degrees[axis] > 1)
    if not live:
        return None
    if len(live) == 1:
        return mesh[live[0]].get_group()
    name = "_".join(live)
    try:  # flatten once per mesh (parallelize may have made the same one for FSDP)
        return mesh[name].get_group()
    except KeyError:
        return mesh[live]._flatten(name).get_group()


def balance_group(mesh, dims: ParallelDims):
    """The ranks whose MoE layers route different tokens of a microbatch: dp_replicate, dp_shard, ep and cp (not tp:
    under sequence parallel the MoE gathers the sequence, so the TP ranks route the same tokens); None if alone."""
    return _flat_group(mesh, dims, (*DATA_AXES, "cp"))


def microbatches_per_step(cfg: JobConfig, dims: ParallelDims) -> int:
    """Global microbatches per optimizer step: the balance loss's unit (pipeline microbatches x accumulation)."""
    per_batch = (cfg.parallel.microbatches or 2 * dims.pp) if dims.pp > 1 else 1
    return per_batch * cfg.training.grad_accum_steps


def setup_balance_stats(model, cfg: JobConfig, dims: ParallelDims, mesh) -> None:
    """Counts all-reduced over the data and context axes; with several microbatches per step, added up over them and
    reset after each step's backward."""
    group = balance_group(mesh, dims) if mesh is not None else None
    accumulate = microbatches_per_step(cfg, dims) > 1
    stats = [moe.balance for moe in model.moe_layers()]
    for s in stats:
        s.group, s.accumulate = group, accumulate
    if accumulate:
        model.after_backward.append(lambda: [s.reset() for s in stats])


def global_microbatch_plan(rank: int, n_ranks: int, rows: int, n_micro: int):
    """How data rank `rank` trades rows so that its microbatch m holds its share of chunk m of the global batch.

    Before: rank q holds global rows q*rows .. (q+1)*rows-1. After: rank r's local row m*b + i (b = rows/n_micro) is
    global row m*b*n_ranks + r*b + i. Returns (send_order, send_splits, recv_order, recv_splits): send the local rows
    `send_order` (grouped by destination rank, sizes `send_splits`); the received rows, grouped by source rank (sizes
    `recv_splits`), go to the local positions `recv_order`."""
    b = rows // n_micro
    local = torch.arange(rows)
    held = rank * rows + local  # global rows this rank holds now
    dest = (held % (b * n_ranks)) // b
    send_order = torch.argsort(dest, stable=True)
    wanted = (local // b) * b * n_ranks + rank * b + local % b  # global rows this rank's microbatches need
    source = wanted // rows
    recv_order = torch.argsort(source, stable=True)
    count = lambda owner: torch.bincount(owner, minlength=n_ranks).tolist()  # noqa: E731
    return send_order, count(dest), recv_order, count(source)


class GlobalMicrobatchSchedule:
    """A pipeline schedule whose training microbatch m on every data rank is that rank's share of chunk m of the
    global batch (see the module docstring). Evaluation needs no balance statistics and passes through."""

    def __init__(self, schedule, group, n_micro: int):
        self.schedule, self.group, self.n_micro = schedule, group, n_micro
        self.rank, self.n_ranks = dist.get_rank(group), dist.get_world_size(group)

    def regroup(self, rows_BS: torch.Tensor) -> torch.Tensor:
        send_order, send_splits, recv_order, recv_splits = global_microbatch_plan(self.rank, self.n_ranks, rows_BS.shape[0], self.n_micro)
        sent = rows_BS[send_order.to(rows_BS.device)].contiguous()
        received = sent.new_empty(sent.shape)
        dist.all_to_all_single(received, sent, recv_splits, send_splits, group=self.group)
        return torch.empty_like(received).index_copy_(0, recv_order.to(received.device), received)

    def step(self, *args, **kwargs):
        args = tuple(self.regroup(a) for a in args)
        if kwargs.get("target") is not None:
            kwargs["target"] = self.regroup(kwargs["target"])
        return self.schedule.step(*args, **kwargs)

    def eval(self, *args, **kwargs):
        return self.schedule.eval(*args, **kwargs)


def global_microbatches(schedule, cfg: JobConfig, dims: ParallelDims, mesh):
    """The schedule, wrapped to form global microbatches when several data ranks each split their rows."""
    n_micro = cfg.parallel.microbatches or 2 * dims.pp
    group = _flat_group(mesh, dims, DATA_AXES)
    if group is None or n_micro == 1:
        return schedule
    coord = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    data_rank = (coord["dp_replicate"] * dims.dp_shard + coord["dp_shard"]) * dims.ep + coord["ep"]  # the loader's
    if dist.get_rank(group) != data_rank:
        raise RuntimeError(f"data group rank {dist.get_rank(group)} is not the loader's data rank {data_rank}")
    return GlobalMicrobatchSchedule(schedule, group, n_micro)
