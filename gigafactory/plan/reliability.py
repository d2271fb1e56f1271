"""Failure losses of a planned run: the simulator's expected ETTR for the chosen layout and recovery mode.

The shipped failure classes (gigafactory/simulate/failure_rates.toml) are scaled so that one GPU-day sees
`cluster.gpu_failures_per_day` failures as the catalog default does (0 = no failures: ETTR 1 and no checkpoints
needed). The job is the layout's: its step time, its checkpoint write time, and, under replica recovery, one replica
group per dp_replicate index (world / dp_replicate GPUs, rounded up to whole nodes: a node's failure takes out every
group on it) whose state is the whole model's, moved over the cluster's scale-out link. Restart and detection times
are the simulator's defaults. Closed form (simulate/expected.py): microseconds per call, no simulation.
"""

from __future__ import annotations

import math
from functools import lru_cache

from gigafactory.errors import UserError
from gigafactory.plan.cost import StepEstimate
from gigafactory.plan.forecast import CHECKPOINT_BYTES_PER_PARAM, Forecast
from gigafactory.plan.hardware import Cluster, load_catalog
from gigafactory.plan.power import energy_mwh, profile
from gigafactory.plan.workload import Workload
from gigafactory.simulate.config import ClusterSpec, JobSpec, SimConfig
from gigafactory.simulate.expected import expected
from gigafactory.simulate.failures import load_failure_classes
from gigafactory.simulate.recovery import MODES, RecoverySpec

RECOVERY_MODES = MODES


@lru_cache(maxsize=1)
def _default_rate() -> float:
    return float(load_catalog().defaults.get("gpu_failures_per_day", 4.7e-4))


@lru_cache(maxsize=1)
def _classes() -> tuple:
    """The shipped failure classes, read once (the layout choice prices dozens of candidates)."""
    return tuple(load_failure_classes())


def sim_config(est: StepEstimate, fc: Forecast, w: Workload, cluster: Cluster, recovery: str) -> SimConfig:
    """The simulator's view of this planned run."""
    node = cluster.gpu.gpus_per_node
    group = est.layout.world // max(1, est.layout.dp_replicate)
    group = min(cluster.n_gpus, max(node, math.ceil(group / node) * node))
    return SimConfig(
        cluster=ClusterSpec(gpus=cluster.n_gpus, gpus_per_node=node, spare_nodes=0,
                            rate_scale=cluster.gpu_failures_per_day / _default_rate()),
        job=JobSpec(step_time_s=est.step_time_s, tokens_per_step=float(est.tokens_per_step), checkpoint_s=fc.checkpoint_time_s),
        recovery=RecoverySpec(recovery=recovery, replica_group_gpus=group, params=float(w.params_total),
                              state_bytes_per_param=float(CHECKPOINT_BYTES_PER_PARAM), peer_gbps_per_gpu=cluster.nic_gbps),
    )


def with_failures(est: StepEstimate, fc: Forecast, w: Workload, cluster: Cluster, recovery: str) -> dict:
    """ETTR and the run's days, GPU-hours, energy and cost once failures (and checkpoints) are paid for."""
    cfg = sim_config(est, fc, w, cluster, recovery)
    cfg.validate()
    classes = list(_classes())
    failures = sum(c.rate_per_s(cfg.cluster) for c in classes if c.kills_job) * 86400.0
    try:
        exp = expected(cfg, classes)
    except OverflowError:  # exp(restart / mtbi): restarts take hundreds of times longer than the gap between failures
        raise UserError(f"{failures:.3g} interruptions a day on {cluster.n_gpus:,} GPUs (one every {86400 / failures:.2g} s) "
                        "leave no time to train between restarts; check --failures-per-gpu-day") from None
    ettr = exp["ettr"]
    restarts = 86400.0 / exp["mtbi_s"] if exp.get("mtbi_s") else 0.0
    grow = 1.0 / ettr if ettr > 0 else math.inf
    # energy from the power profile: steps (productive or re-run) at the step's average draw, pauses at idle
    stall, restart = cfg.job.stall_s(), cfg.job.restart_s() + float(exp.get("detect_s") or 0.0)
    tau = exp.get("interval_s") or 0.0
    ckpt_fraction = stall / (tau + stall) if tau and restarts else 0.0
    seconds = fc.days * 86400.0
    wall = seconds * grow if math.isfinite(grow) else seconds
    power = profile(est, cluster, stall, restart)
    energy = energy_mwh(power, seconds, ettr, ckpt_fraction, restarts / 86400.0 * wall * restart, cluster.pue)
    return {
        "power": power, "energy_mwh_failure_free": energy_mwh(power, seconds, 1.0, 0.0, 0.0, cluster.pue),
        "facility_mw_avg": power["step_avg_it_mw"] * cluster.pue,
        "recovery": recovery, "ettr": ettr, "interruptions_per_day": failures, "restarting_failures_per_day": restarts,
        "replica_groups": cfg.groups, "replica_group_gpus": cfg.recovery.replica_group_gpus,
        "params": float(w.params_total),
        "days_failure_free": fc.days, "gpu_hours_failure_free": fc.gpu_hours, "cost_usd_failure_free": fc.cost_usd,
        "days": fc.days * grow, "gpu_hours": fc.gpu_hours * grow, "energy_mwh": energy, "cost_usd": fc.cost_usd * grow,
    }


def best_with_failures(estimates: list[StepEstimate], w: Workload, cluster: Cluster, tokens: float,
                       recovery: str) -> tuple[StepEstimate, Forecast, dict]:
    """Of the search's fastest layouts, the one that finishes first once failures are paid for: under replica
    recovery a layout with more replica groups (dp_replicate) loses less per failure than a slightly faster one."""
    from gigafactory.plan.forecast import forecast

    scored = []
    for est in estimates:
        fc = forecast(est, w, cluster, tokens)
        failures = with_failures(est, fc, w, cluster, recovery)
        scored.append((failures["days"], est.step_time_s / est.tokens_per_step, est, fc, failures))
    scored.sort(key=lambda s: (s[0], s[1]))
    _, _, est, fc, failures = scored[0]
    return est, fc, failures
