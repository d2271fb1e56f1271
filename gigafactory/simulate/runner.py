"""Run a SimConfig over its seeds and summarise: interruptions, MTBI, ETTR, goodput, lost work, time per state."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gigafactory.errors import UserError
from gigafactory.simulate import analytic, expected
from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.engine import STATES, Job, RunResult, run_events, seeds_for, summarize
from gigafactory.simulate.failures import FailureClass, job_mtbi_s, load_failure_classes, validate_class
from gigafactory.simulate.replica import ReplicaJob


def run_once(cfg: SimConfig, classes: list[FailureClass], interval_s: float, seed: int) -> RunResult:
    """Simulate one job for cfg.sim.days with the given compute time between checkpoints, in cfg's recovery mode."""
    if not interval_s > 0:
        raise ValueError("interval_s must be > 0")
    kind = ReplicaJob if cfg.recovery.recovery == "replica" else Job
    return run_events(kind(cfg, classes, interval_s, seed), cfg, classes, seed)


@dataclass
class Report:
    """All seeds of one configuration plus the analytic expectation for it."""

    cfg: SimConfig
    classes: list[FailureClass]
    interval_s: float
    runs: list[RunResult]
    expected: dict

    def ettr(self) -> tuple[float, float]:
        return summarize([r.ettr for r in self.runs])

    def to_dict(self) -> dict:
        cfg, job, n = self.cfg, self.cfg.job, len(self.runs)
        horizon = cfg.sim.horizon_s
        ettr, ettr_std = self.ettr()
        mean = lambda f: sum(f(r) for r in self.runs) / n  # noqa: E731
        n_int = mean(lambda r: r.n_interruptions)
        restarts = mean(lambda r: r.job_restarts)
        failures = mean(lambda r: sum(r.arrivals.values()))
        rec = cfg.recovery
        useful, lost = mean(lambda r: r.useful_s), mean(lambda r: r.lost_s)
        states = {s: mean(lambda r, s=s: r.state_s[s]) for s in STATES}
        states = {"compute_useful": useful, "compute_lost": lost, **{k: v for k, v in states.items() if k != "compute"}}
        return {
            "inputs": {
                "gpus": cfg.cluster.gpus, "gpus_per_node": cfg.cluster.gpus_per_node, "nodes": cfg.cluster.nodes,
                "spare_nodes": cfg.cluster.spare_nodes, "distribution": cfg.cluster.distribution,
                "step_time_s": job.step_time_s, "tokens_per_step": job.tokens_per_step, "checkpoint_s": job.checkpoint_s,
                "checkpoint_mode": job.checkpoint_mode, "checkpoint_stall_s": job.stall_s(),
                "checkpoint_policy": job.checkpoint_policy, "checkpoint_interval_s": self.interval_s,
                "checkpoint_interval_steps": self.interval_s / job.step_time_s, "restart_s": job.restart_s(),
                "in_memory_recovery": job.in_memory_recovery, "days": cfg.sim.days, "seeds": seeds_for(cfg),
                "recovery": rec.recovery, "replica_groups": cfg.groups,
                "replica_group_gpus": rec.replica_group_gpus if rec.recovery == "replica" else cfg.cluster.gpus,
                **({"min_replicas": rec.min_replicas, "ft_detect_s": rec.ft_detect_s, "ft_timeout_s": rec.ft_timeout_s,
                    "quorum_s": rec.quorum_s, "group_restart_s": rec.group_restart_s, "peer_gbps_per_gpu": rec.peer_gbps_per_gpu,
                    "group_state_bytes": rec.state_bytes(), "peer_transfer_s": rec.transfer_s()} if rec.recovery == "replica" else {}),
            },
            "failures": failures,
            "interruptions": n_int,
            "job_restarts": restarts,
            "failures_while_down": mean(lambda r: r.while_down),
            "rejoins": mean(lambda r: r.rejoins),
            "interruptions_by_cause": {c: mean(lambda r, c=c: r.interruptions[c]) for c in self.runs[0].interruptions},
            "non_fatal_by_cause": {c: mean(lambda r, c=c: r.non_fatal[c]) for c in self.runs[0].non_fatal},
            "failures_during_maintenance": mean(lambda r: r.during_maintenance),
            "maintenance_windows": mean(lambda r: r.maintenance_windows),
            "mtbi_s": horizon / failures if failures else None,
            "mean_time_between_job_restarts_s": horizon / restarts if restarts else None,
            "ettr": ettr,
            "ettr_std": ettr_std,
            "goodput_tokens_per_s": ettr * job.tokens_per_step / job.step_time_s,
            "steps_kept": useful / job.step_time_s,
            "tokens_kept": useful / job.step_time_s * job.tokens_per_step,
            "lost_work_s": lost,
            "lost_gpu_hours": lost * cfg.cluster.gpus / 3600.0,
            "time_s": states,
            "time_fraction": {k: v / horizon for k, v in states.items()},
            "expected": self.expected,
        }


def resolve_classes(cfg: SimConfig, classes: list[FailureClass] | None) -> list[FailureClass]:
    if classes is None:
        return load_failure_classes(cfg.cluster.failure_rates or None)
    for c in classes:
        validate_class(c)
    return classes


def checkpoint_interval(cfg: SimConfig, classes: list[FailureClass]) -> float:
    """Compute time between checkpoints: fixed, or Young's / Daly's optimum for this cluster's MTBI."""
    job = cfg.job
    if job.checkpoint_policy == "fixed":
        return job.checkpoint_interval_s
    mtbi = expected.kill_mtbi_s(cfg, classes)
    if math.isinf(mtbi):
        return cfg.sim.horizon_s
    delta = job.stall_s()
    if delta <= 0:
        return job.step_time_s  # free checkpoints: save every step
    rule = analytic.daly_interval if job.checkpoint_policy == "daly" else analytic.young_interval
    return max(rule(delta, mtbi), job.step_time_s)


def mean_detect_s(cfg: SimConfig, classes: list[FailureClass]) -> float:
    """Rate-weighted downtime before a job restart (D in the analytic formulas): detection, or an outage if longer."""
    return expected.kill_rates(cfg, classes)[1]


def auto_spares(cfg: SimConfig, classes: list[FailureClass]) -> int:
    """Spares covering the nodes expected in repair at once (Little's law: rate x time) plus 4 Poisson sigmas."""
    in_repair = sum(c.rate_per_s(cfg.cluster) * c.nodes_affected * c.repair_s for c in classes if c.kills_job)
    return math.ceil(in_repair + 4.0 * math.sqrt(in_repair))


def simulate(cfg: SimConfig, classes: list[FailureClass] | None = None) -> Report:
    """Validate, pick the interval and spares, run every seed, attach the analytic expectation."""
    cfg.validate()
    classes = resolve_classes(cfg, classes)
    if cfg.cluster.spare_nodes == -1:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, spare_nodes=auto_spares(cfg, classes)))
    interval = checkpoint_interval(cfg, classes)
    if not interval > 0:
        raise UserError(f"checkpoint interval {interval} s must be > 0")
    runs = [run_once(cfg, classes, interval, seed) for seed in seeds_for(cfg)]
    exp = expected.expected(cfg, classes, interval)
    fleet_mtbi = job_mtbi_s(classes, cfg.cluster)
    exp["failures_mtbi_s"] = None if math.isinf(fleet_mtbi) else fleet_mtbi
    exp["assumes"] = "exponential failures, sync checkpoints, no wait for repairs, no maintenance, no in-memory recovery" + (
        ", at most one group out at a time" if cfg.recovery.recovery == "replica" else "")
    return Report(cfg=cfg, classes=classes, interval_s=interval, runs=runs, expected=exp)
