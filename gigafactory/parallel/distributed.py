"""Process-group setup from the standard torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device_type: str, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the job's process group (NCCL on CUDA, gloo on CPU); (rank, world_size), (0, 1) outside torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        rank = int(os.environ["RANK"])
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, timeout = ("nccl" if device_type == "cuda" else "gloo"), timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The agents' store outlives worker restarts and torch adds no per-attempt prefix: without one a
            # restarted group reads the dead attempt's keys (seen hanging on gloo). The restart count is only
            # consistent across agents on one node (`--standalone`); multi-node launch files therefore set
            # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a fresh store per rendezvous round (the branch below).
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:  # torch's env:// rendezvous: rank 0 hosts this round's store
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(value: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """Mean over all ranks. A float comes back a float; a 0-dim device tensor stays one (no host read)."""
    if not dist.is_initialized():
        return value
    if isinstance(value, torch.Tensor):
        t = value.reshape(1).clone()
        dist.all_reduce(t)
        return t[0] / dist.get_world_size()
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def sum_grads(params, group) -> None:
    """All-reduce (sum) the gradients of parameters that several ranks each hold a partial gradient of.
    FSDP-sharded DTensor grads are summed shard by shard (every rank in `group` shards them alike)."""
    from torch.distributed.tensor import DTensor

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=group)


# ---- helpers that also work without a process group (a single process is world size 1) -------------------------
def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_gather_objects(obj, group=None) -> list:
    """Every rank's obj, in rank order (`group`: a process group spanning all ranks, default the world)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_from_rank0(obj, group=None):
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def destroy_distributed() -> None:
    """Leave the job's process groups in order (every rank, after its last collective), so no communicator thread
    outlives the interpreter (seen as 'terminate called without an active exception' at exit otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
