"""Context parallel: the sequence is split over the `cp` axis; each rank gathers every rank's keys and values.

Causal attention does more work late in the sequence, so the sequence is cut into 2*cp chunks and rank r keeps
chunks r and 2*cp-1-r (the load balancing of Llama 3 / Megatron). Attention masks by absolute positions, so gathered
keys are masked correctly wherever they came from. The gather is differentiable (its backward is a reduce-scatter).
Packed documents (SFT, DPO) gather their document ids the same way, so a query sees only its own document's keys.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from gigafactory.models import GrokModel


def shard_sequence(x_BS: torch.Tensor, cp_rank: int, cp: int) -> torch.Tensor:
    """This rank's load-balanced part of dim 1: chunks cp_rank and 2*cp-1-cp_rank of 2*cp."""
    chunks = x_BS.chunk(2 * cp, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=1)


class KVGather:
    """Called by Attention with local (k, v, key positions); returns the full sequence's."""

    def __init__(self, group):
        self.group = group

    def __call__(self, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, positions_BS: torch.Tensor):
        k = funcol.all_gather_tensor_autograd(k_BGSD.contiguous(), gather_dim=2, group=self.group)
        v = funcol.all_gather_tensor_autograd(v_BGSD.contiguous(), gather_dim=2, group=self.group)
        pos = funcol.all_gather_tensor(positions_BS.contiguous(), gather_dim=1, group=self.group)
        return funcol.wait_tensor(k), funcol.wait_tensor(v), funcol.wait_tensor(pos)

    def gather_ids(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Per-token labels (document ids) of the whole sequence, in the gathered keys' order."""
        return funcol.wait_tensor(funcol.all_gather_tensor(ids_BS.contiguous(), gather_dim=1, group=self.group))


def apply_cp(model: GrokModel, cp_mesh) -> None:
    gather = KVGather(cp_mesh.get_group())
    model.context_parallel = True
    for block in model.layers.values():
        block.attn.kv_gather = gather
