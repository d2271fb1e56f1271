"""Global microbatches under pipeline x data parallel: the row exchange gives data rank r, as its microbatch m, its
share of chunk m of the global batch (what gradient accumulation reads), whatever the rank count and row split."""

from __future__ import annotations

import pytest
import torch

from gigafactory.config.loader import build_config
from gigafactory.parallel.balance import global_microbatch_plan, microbatches_per_step
from gigafactory.parallel.dims import resolve_dims


def exchange(n_ranks: int, rows: int, n_micro: int) -> list[torch.Tensor]:
    """Every rank's rows after the exchange, simulated in one process; rows are labelled by their global index."""
    plans = [global_microbatch_plan(r, n_ranks, rows, n_micro) for r in range(n_ranks)]
    held = [torch.arange(q * rows, (q + 1) * rows) for q in range(n_ranks)]
    # what q sends to r: its rows in send order, the slice for destination r
    parcels = []
    for q, (send_order, send_splits, _, _) in enumerate(plans):
        parcels.append(list(held[q][send_order].split(send_splits)))
    result = []
    for r, (_, _, recv_order, recv_splits) in enumerate(plans):
        received = torch.cat([parcels[q][r] for q in range(n_ranks)])
        assert [len(parcels[q][r]) for q in range(n_ranks)] == recv_splits
        result.append(torch.empty_like(received).index_copy_(0, recv_order, received))
    return result


@pytest.mark.parametrize("n_ranks,rows,n_micro", [(2, 2, 2), (2, 4, 4), (4, 8, 2), (3, 6, 3), (2, 6, 1)])
def test_each_ranks_microbatch_m_is_its_share_of_global_chunk_m(n_ranks, rows, n_micro):
    after = exchange(n_ranks, rows, n_micro)
    global_chunks = torch.arange(n_ranks * rows).chunk(n_micro)
    b = rows // n_micro
    for m, chunk in enumerate(global_chunks):
        union = torch.cat([after[r][m * b : (m + 1) * b] for r in range(n_ranks)])
        assert union.tolist() == chunk.tolist()  # rank r holds the r-th slice of chunk m, in order
    assert sorted(torch.cat(after).tolist()) == list(range(n_ranks * rows))  # nothing lost or duplicated


def test_microbatches_per_step_counts_pipeline_microbatches_and_accumulation():
    def count(**dotted):
        cfg = build_config({}, {k.replace("__", "."): v for k, v in dotted.items()})
        return microbatches_per_step(cfg, resolve_dims(cfg, 2))

    assert count(parallel__dp_shard=2) == 1
    assert count(parallel__dp_shard=2, training__grad_accum_steps=3) == 3
    assert count(parallel__pp=2, parallel__dp_shard=1) == 4  # 2 * pp by default
    assert count(parallel__pp=2, parallel__dp_shard=1, parallel__microbatches=2) == 2
