"""The discrete-event simulation of one training job (one seed).

Events are job-level: failure arrivals (pre-drawn, sorted), node repairs and maintenance windows (a heap), and the end
of the current phase. Between events the job's progress is computed in closed form, so a run costs O(failures), not
O(steps or checkpoints): 100,000 GPUs x 90 days is a few thousand events.

Phases: run (compute tau, stall for a checkpoint, repeat) -> on a job-killing failure: detect -> wait_for_nodes (only
if spares ran out) -> restart (reschedule + load + warmup) -> run. A failure during restart kills the relaunch and
starts detect again; a failure while the job is already dead (detect, wait) only sends its node to repair.
Planned maintenance: the job saves (no work lost), is down for the window, then restarts; a window that falls in a
recovery starts when the job could restart.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.failures import FailureClass, sample_arrivals

STATES = ("compute", "checkpoint", "detect", "wait_for_nodes", "restart", "maintenance")
_REPAIR, _MAINT = 0, 1


@dataclass
class RunResult:
    """What one seed of the simulation measured (times in seconds)."""

    seed: int
    horizon_s: float
    interval_s: float
    useful_s: float
    lost_s: float
    state_s: dict[str, float]
    interruptions: dict[str, int]
    non_fatal: dict[str, int]
    during_maintenance: int
    maintenance_windows: int
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    work_trace: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ettr(self) -> float:
        return self.useful_s / self.horizon_s

    @property
    def n_interruptions(self) -> int:
        return sum(self.interruptions.values())


class _Job:
    """Mutable state of the job while the event loop runs."""

    def __init__(self, cfg: SimConfig, classes: list[FailureClass], interval_s: float, seed: int):
        self.cfg, self.classes, self.tau = cfg, classes, interval_s
        job = cfg.job
        self.stall = job.stall_s()
        self.period = self.tau + self.stall
        self.write_lag = job.checkpoint_s - self.stall  # extra time until an async write is durable
        self.in_memory = job.in_memory_recovery
        self.record = cfg.sim.timeline
        self.state_s = dict.fromkeys(STATES, 0.0)
        self.res = RunResult(
            seed=seed, horizon_s=cfg.sim.horizon_s, interval_s=interval_s, useful_s=0.0, lost_s=0.0, state_s=self.state_s,
            interruptions={c.name: 0 for c in classes if c.kills_job}, non_fatal={c.name: 0 for c in classes if not c.kills_job},
            during_maintenance=0, maintenance_windows=0,
        )
        self.work = 0.0  # training work done (seconds of compute), as of `self.t`
        self.work_storage = 0.0  # work in the newest checkpoint on durable storage
        self.work_memory = 0.0  # work in the newest in-memory (peer) checkpoint
        self.spares = cfg.cluster.spare_nodes
        self.missing = 0  # job nodes failed with no spare to replace them
        self.t = 0.0
        self.from_memory = False
        self.maintenance_due = False
        self._enter("run", 0.0)

    # -- phases --------------------------------------------------------------------------------------------------
    def _enter(self, phase: str, t: float, length: float = math.inf) -> None:
        self.phase, self.phase_start, self.phase_end = phase, t, t + length
        if phase == "run":
            self.run_work0 = self.work
            if self.record:
                self.res.work_trace.append((t, self.work))

    def _run_progress(self, elapsed: float) -> tuple[float, float, int, int]:
        """(compute, stall, checkpoints in memory, checkpoints durable on storage) after `elapsed` s of running."""
        k = int(elapsed // self.period)
        rem = elapsed - k * self.period
        compute = k * self.tau + min(rem, self.tau)
        stall = k * self.stall + max(0.0, rem - self.tau)
        durable = k if self.write_lag <= 0 else max(0, min(k, int((elapsed - self.write_lag) // self.period)))
        return compute, stall, k, durable

    def account(self, t: float) -> None:
        """Advance the clock to t, charging the time to the current phase."""
        dt = t - self.t
        if dt <= 0:
            return
        if self.phase == "run":
            c0, s0, _, _ = self._run_progress(self.t - self.phase_start)
            c1, s1, k, durable = self._run_progress(t - self.phase_start)
            self.state_s["compute"] += c1 - c0
            self.state_s["checkpoint"] += s1 - s0
            self.work = self.run_work0 + c1
            if k:
                self.work_memory = max(self.work_memory, self.run_work0 + k * self.tau)
            if durable:
                self.work_storage = max(self.work_storage, self.run_work0 + durable * self.tau)
        else:
            self.state_s[self.phase] += dt
        if self.record:
            self.res.timeline.append((self.t, t, self.phase))
        self.t = t

    def _begin_restart(self, t: float) -> None:
        if self.maintenance_due:
            self._start_maintenance(t)
        elif self.missing > 0:
            self._enter("wait_for_nodes", t)
        else:
            self._enter("restart", t, self.cfg.job.restart_s(from_memory=self.from_memory))

    def end_phase(self, t: float) -> None:
        if self.phase in ("detect", "maintenance"):
            self._begin_restart(t)
        elif self.phase == "restart":
            self._enter("run", t)

    # -- events --------------------------------------------------------------------------------------------------
    def on_failure(self, t: float, cls: FailureClass, heap: list) -> None:
        if not cls.kills_job:
            self.res.non_fatal[cls.name] += 1
            return
        if cls.repair_s > 0:
            for _ in range(cls.nodes_affected):
                heapq.heappush(heap, (t + cls.repair_s, _REPAIR))
                if self.spares > 0:
                    self.spares -= 1
                else:
                    self.missing += 1
        if self.phase == "maintenance":
            self.res.during_maintenance += 1
            return
        self.res.interruptions[cls.name] += 1
        recoverable = self.in_memory and cls.nodes_affected == 1
        already_recovering = self.phase != "run"
        target = self.work_memory if recoverable else self.work_storage
        if self.record:
            self.res.work_trace.append((t, self.work))
            self.res.failures.append((t, cls.name))
        self.res.lost_s += self.work - target
        self.work = target
        if not recoverable:
            self.work_memory = self.work_storage
        if self.record:
            self.res.work_trace.append((t, self.work))
        self.from_memory = recoverable and (not already_recovering or self.from_memory)
        if self.phase in ("run", "restart"):  # the running job (or its relaunch) dies: detect it, then restart
            self._enter("detect", t, cls.detect_s)
        # already dead (detect / wait_for_nodes): the failed node is excluded at restart, no extra detection

    def on_repair(self, t: float) -> None:
        if self.missing > 0:
            self.missing -= 1
            if self.phase == "wait_for_nodes" and self.missing == 0:
                self._begin_restart(t)
        else:
            self.spares += 1

    def on_maintenance(self, t: float) -> None:
        if self.phase == "run":
            self.work_storage = self.work_memory = self.work  # the job saves before the window
            self._start_maintenance(t)
        elif self.phase == "restart":
            self._start_maintenance(t)  # the relaunch is abandoned and redone after the window
        elif self.phase in ("detect", "wait_for_nodes"):
            self.maintenance_due = True  # the window starts when the job could restart

    def _start_maintenance(self, t: float) -> None:
        self.res.maintenance_windows += 1
        self.maintenance_due = False
        self.from_memory = False
        self._enter("maintenance", t, self.cfg.cluster.maintenance_s)


def run_once(cfg: SimConfig, classes: list[FailureClass], interval_s: float, seed: int) -> RunResult:
    """Simulate one job for cfg.sim.days with the given compute time between checkpoints."""
    if not interval_s > 0:
        raise ValueError("interval_s must be > 0")
    horizon = cfg.sim.horizon_s
    times, kinds = sample_arrivals(classes, cfg.cluster, horizon, seed)
    job = _Job(cfg, classes, interval_s, seed)
    heap: list[tuple[float, int]] = []
    every = cfg.cluster.maintenance_every_days * 86400.0
    if every > 0 and every < horizon:
        heapq.heappush(heap, (every, _MAINT))
    times_list: list[float] = times.tolist()
    kinds_list: list[int] = kinds.tolist()
    i, n = 0, len(times_list)
    while True:
        t_fail = times_list[i] if i < n else math.inf
        t_heap = heap[0][0] if heap else math.inf
        t_next = min(t_fail, t_heap, job.phase_end, horizon)
        job.account(t_next)
        if t_next >= horizon:
            break
        if t_next == job.phase_end:
            job.end_phase(t_next)
        elif t_next == t_fail:
            job.on_failure(t_next, classes[kinds_list[i]], heap)
            i += 1
        else:
            _, kind = heapq.heappop(heap)
            if kind == _REPAIR:
                job.on_repair(t_next)
            else:
                job.on_maintenance(t_next)
                heapq.heappush(heap, (t_next + every, _MAINT))
    job.res.useful_s = job.work
    if job.record:
        job.res.work_trace.append((horizon, job.work))
    return job.res


def seeds_for(cfg: SimConfig) -> list[int]:
    return [cfg.sim.seed + s for s in range(cfg.sim.seeds)]


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
