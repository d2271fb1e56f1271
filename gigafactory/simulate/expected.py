"""Expected ETTR of one configuration in closed form, for either recovery mode (cheap enough for `plan`'s inner loop).

job-restart: Daly's segment formula (analytic.expected_ettr) with M = mean time between job-killing failures and
D = their rate-weighted downtime before the restart (detection, or a shared service's outage if longer).

replica: the same formula for what still restarts the job (per-job classes, faults that spread to every replica,
blocks of nodes that leave fewer than min_replicas live groups), times (1 - the fraction of capacity absorbed failures cost). One absorbed failure costs
the survivors' stall (detection + quorum change), half a step in flight, and per struck group one rejoin stall
(quorum + peer transfer) plus the group's absence (its detection + restart) divided by the groups. First order in the
absorbed rate: two groups out at once, waits for repair (spares assumed sufficient) and in-memory snapshots are not
in the formula; the simulation has them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from gigafactory.simulate import analytic
from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.failures import FailureClass


@lru_cache(maxsize=256)
def block_stats(nodes: int, groups: int, block: int, min_replicas: int) -> tuple[float, float]:
    """(P[a block of `block` neighbouring nodes leaves < min_replicas groups], E[groups it strikes | it does not]).

    The block starts at a uniformly random node (as in the simulation); node n belongs to group n x groups // nodes.
    """
    if groups <= 1:
        return 1.0, 0.0
    n = min(block, nodes)
    start = np.arange(nodes - n + 1)
    hit = (start + n - 1) * groups // nodes - start * groups // nodes + 1
    kills = groups - hit < min_replicas
    p_kill = float(kills.mean())
    return p_kill, float(hit[~kills].mean()) if p_kill < 1 else 0.0


def split(cfg: SimConfig, c: FailureClass) -> tuple[float, float]:
    """(fraction of this class's failures that restart the job, mean groups struck by the others)."""
    if cfg.recovery.recovery != "replica" or c.per == "job" or c.spreads:
        return 1.0, 0.0
    return block_stats(cfg.cluster.nodes, cfg.groups, c.nodes_affected, cfg.recovery.min_replicas)


def kill_rates(cfg: SimConfig, classes: list[FailureClass]) -> tuple[float, float]:
    """(job-restarting failures per second, their rate-weighted downtime before the restart in seconds)."""
    rate = down = 0.0
    for c in classes:
        if c.kills_job:
            lam = c.rate_per_s(cfg.cluster) * split(cfg, c)[0]
            rate += lam
            down += lam * max(c.detect_s, c.outage_s)
    return rate, (down / rate if rate > 0 else 0.0)


def kill_mtbi_s(cfg: SimConfig, classes: list[FailureClass]) -> float:
    """Mean time between failures that restart the whole job under cfg's recovery mode (inf if none)."""
    rate, _ = kill_rates(cfg, classes)
    return 1.0 / rate if rate > 0 else math.inf


def absorbed_loss(cfg: SimConfig, classes: list[FailureClass]) -> tuple[float, float]:
    """(absorbed failures per second, fraction of the job's capacity they cost). (0, 0) under job-restart."""
    rec, groups = cfg.recovery, cfg.groups
    rate = loss = 0.0
    for c in classes:
        p_kill, struck = split(cfg, c)
        if not c.kills_job or p_kill >= 1.0:
            continue
        lam = c.rate_per_s(cfg.cluster) * (1.0 - p_kill)
        per_failure = (rec.survivor_stall_s(c.hangs) + cfg.job.step_time_s / 2.0
                       + struck * (rec.rejoin_stall_s() + (c.detect_s + rec.group_restart_s) / groups))
        rate += lam
        loss += lam * per_failure
    return rate, loss


def expected(cfg: SimConfig, classes: list[FailureClass], interval_s: float | None = None) -> dict:
    """Young, Daly and exact optima for the job-restarting failures, and the expected ETTR at `interval_s` (default:
    Daly's; with no job-restarting failures and no interval given, no checkpoint stall is charged)."""
    delta, restart = cfg.job.stall_s(), cfg.job.restart_s()
    kill_rate, detect = kill_rates(cfg, classes)
    mtbi = 1.0 / kill_rate if kill_rate > 0 else math.inf
    out = analytic.expectations(delta, restart, mtbi, interval_s, detect)
    out.setdefault("detect_s", detect)
    absorbed_rate, loss = absorbed_loss(cfg, classes)
    out["ettr_job_restarts"] = out["ettr"]
    out["absorbed_per_day"] = absorbed_rate * 86400.0
    out["absorbed_loss_fraction"] = loss
    out["ettr"] = out["ettr"] * max(0.0, 1.0 - loss)
    out["groups"] = cfg.groups
    return out
