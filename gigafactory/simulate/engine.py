"""The discrete-event simulation of one training job (one seed), job-restart recovery; replica.py extends it.

Events are job-level: failure arrivals (pre-drawn, sorted), node repairs, group rejoins, site outages and their
ends, and maintenance windows (a heap), and the end of the current phase. Between events the job's progress is computed in closed form, so a run costs
O(failures), not O(steps or checkpoints): 100,000 GPUs x 90 days is a few thousand events.

Phases: run (compute tau, stall for a checkpoint, repeat) -> on a job-killing failure: detect -> outage (only while a
shared service is down) -> wait_for_nodes (only if spares ran out) -> restart (reschedule + load + warmup) -> run. A
failure during restart kills the relaunch and starts detect again; a failure while the job is already dead (detect,
outage, wait) only sends its node to repair. Only failures that stop running work count as interruptions; the others
are counted as `while_down`. Planned maintenance: the job saves (no work lost), is down for the window, then
restarts; a window that falls in a recovery starts when the job could restart.

Work is tracked as a piecewise-linear function of compute time since the run began (breakpoints where the fraction of
the job that trains, `rate`, changes), so replica mode can lose a group's share without giving up the closed form.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.failures import FailureClass, sample_arrivals, sample_positions

STATES = ("compute", "degraded", "checkpoint", "reconfigure", "detect", "outage", "wait_for_nodes", "restart", "maintenance")
ALIVE = ("run", "reconfigure")  # phases in which the job holds running work
_REPAIR, _MAINT, _REJOIN, _SITE = 0, 1, 2, 3


@dataclass
class RunResult:
    """What one seed of the simulation measured (times in seconds)."""

    seed: int
    horizon_s: float
    interval_s: float
    useful_s: float
    lost_s: float
    state_s: dict[str, float]
    interruptions: dict[str, int]  # failures that stopped running work, by cause
    non_fatal: dict[str, int]
    during_maintenance: int
    maintenance_windows: int
    arrivals: dict[str, int] = field(default_factory=dict)  # every failure of a job-killing class, by cause
    while_down: int = 0  # job-killing failures that struck no running work (job or struck groups already down)
    job_restarts: int = 0  # interruptions that restarted the whole job (all of them under job-restart)
    groups: int = 1
    rejoins: int = 0  # replica groups re-admitted from a live peer
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    work_trace: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ettr(self) -> float:
        return self.useful_s / self.horizon_s

    @property
    def n_interruptions(self) -> int:
        return sum(self.interruptions.values())


class Job:
    """Mutable state of the job while the event loop runs (job-restart recovery)."""

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
            during_maintenance=0, maintenance_windows=0, arrivals={c.name: 0 for c in classes if c.kills_job},
        )
        self.work = 0.0  # training work done (seconds of full-job compute), as of `self.t`
        self.work_storage = 0.0  # work in the newest checkpoint on durable storage
        self.work_memory = 0.0  # work in the newest in-memory (peer) checkpoint
        self.spares = cfg.cluster.spare_nodes
        self.missing = 0  # job nodes failed with no spare to replace them
        self.rate = 1.0  # fraction of the job training (replica groups out lower it)
        self.outage_until = 0.0
        self.t = 0.0
        self.from_memory = False
        self.maintenance_due = False
        self._enter("run", 0.0)

    # -- phases --------------------------------------------------------------------------------------------------
    def _enter(self, phase: str, t: float, length: float = math.inf) -> None:
        self.phase, self.phase_start, self.phase_end = phase, t, t + length
        if phase == "run":
            self.run_start = t
            self.bp_c, self.bp_w, self.bp_r = [0.0], [self.work], [self.rate]
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

    def _compute_now(self) -> float:
        """Compute time of the current run so far (frozen while it is paused for a reconfigure)."""
        now = self.pause_t if self.phase == "reconfigure" else self.t
        return self._run_progress(now - self.run_start)[0]

    def _work_at(self, c: float) -> float:
        i = max(0, bisect.bisect_right(self.bp_c, c) - 1)
        return self.bp_w[i] + self.bp_r[i] * (c - self.bp_c[i])

    def _breakpoint(self, work: float, rate: float) -> None:
        """From the current compute time on, work grows from `work` at `rate` (the caller has accounted to now)."""
        if self.phase in ALIVE:
            self.bp_c.append(self._compute_now())
            self.bp_w.append(work)
            self.bp_r.append(rate)
        self.work, self.rate = work, rate

    def account(self, t: float) -> None:
        """Advance the clock to t, charging the time to the current phase."""
        dt = t - self.t
        if dt <= 0:
            return
        if self.phase == "run":
            c0, s0, _, _ = self._run_progress(self.t - self.run_start)
            c1, s1, k, durable = self._run_progress(t - self.run_start)
            self.state_s["compute"] += self.rate * (c1 - c0)
            self.state_s["degraded"] += (1.0 - self.rate) * (c1 - c0)
            self.state_s["checkpoint"] += s1 - s0
            self.work = self._work_at(c1)
            if k:
                self.work_memory = max(self.work_memory, self._work_at(k * self.tau))
            if durable:
                self.work_storage = max(self.work_storage, self._work_at(durable * self.tau))
                if len(self.bp_c) > 64:  # later queries never reach below the newest durable checkpoint
                    i = bisect.bisect_right(self.bp_c, durable * self.tau) - 1
                    del self.bp_c[:i], self.bp_w[:i], self.bp_r[:i]
        else:
            self.state_s[self.phase] += dt
        if self.record:
            self.res.timeline.append((self.t, t, self.phase))
        self.t = t

    def _nodes_missing(self) -> bool:
        return self.missing > 0

    def _begin_restart(self, t: float) -> None:
        if self.maintenance_due:
            self._start_maintenance(t)
        elif self.outage_until > t:
            self._enter("outage", t, self.outage_until - t)
        elif self._nodes_missing():
            self._enter("wait_for_nodes", t)
        else:
            self._enter("restart", t, self.cfg.job.restart_s(from_memory=self.from_memory))

    def _restarted(self, t: float) -> None:
        self._enter("run", t)

    def end_phase(self, t: float) -> None:
        if self.phase in ("detect", "maintenance", "outage"):
            self._begin_restart(t)
        elif self.phase == "restart":
            self._restarted(t)
        elif self.phase == "reconfigure":  # resume the paused run where it stopped
            self.run_start += t - self.pause_t
            self.phase, self.phase_end = "run", math.inf

    # -- events --------------------------------------------------------------------------------------------------
    def on_failure(self, t: float, cls: FailureClass, heap: list, position: float) -> None:
        if self._arrive(t, cls, heap, position):
            self._kill(t, cls, self._memory_survives(cls, position))

    def _arrive(self, t: float, cls: FailureClass, heap: list, position: float) -> bool:
        """Count a failure and send its nodes to repair; True if the job must react (a job-killing failure outside
        a maintenance window)."""
        if not cls.kills_job:
            self.res.non_fatal[cls.name] += 1
            return False
        self.res.arrivals[cls.name] += 1
        self._take_nodes(t, cls, heap, position)
        if self.phase == "maintenance":
            self.res.during_maintenance += 1
            return False
        return True

    def _take_nodes(self, t: float, cls: FailureClass, heap: list, position: float) -> None:
        if cls.repair_s > 0:
            for _ in range(cls.nodes_affected):
                heapq.heappush(heap, (t + cls.repair_s, _REPAIR, 0))
                if self.spares > 0:
                    self.spares -= 1
                else:
                    self.missing += 1

    def _memory_survives(self, cls: FailureClass, position: float) -> bool:
        """A peer still holds the in-memory checkpoint: one node lost (its mirror is elsewhere), or none."""
        return self.in_memory and cls.nodes_affected == 1 and not cls.spreads

    def _memory_work(self) -> float:
        return self.work_memory

    def _kill(self, t: float, cls: FailureClass, recoverable: bool) -> None:
        """The whole job dies: roll back to the newest usable checkpoint, detect, then restart."""
        running = self.phase in ALIVE
        if running:
            self.res.interruptions[cls.name] += 1
            self.res.job_restarts += 1
        else:
            self.res.while_down += 1
        if cls.outage_s > 0:
            self.outage_until = max(self.outage_until, t + cls.outage_s)
        self._roll_back(t, cls.name, recoverable)
        self.from_memory = recoverable and (running or self.from_memory)
        if self.phase in ALIVE or self.phase == "restart":  # the running job (or its relaunch) dies: detect, restart
            self._enter("detect", t, cls.detect_s)
        # already dead (detect / outage / wait_for_nodes): the failed node is excluded at restart, no extra detection

    def _roll_back(self, t: float, cause: str, recoverable: bool) -> None:
        """Lose the work since the newest usable checkpoint: the in-memory one when it survived, else storage's."""
        target = self._memory_work() if recoverable else self.work_storage
        if self.record:
            self.res.work_trace.append((t, self.work))
            self.res.failures.append((t, cause))
        self.res.lost_s += self.work - target
        self.work = target
        if not recoverable:
            self.work_memory = self.work_storage
        if self.record:
            self.res.work_trace.append((t, self.work))

    def on_repair(self, t: float) -> None:
        if self.missing > 0:
            self.missing -= 1
            if self.phase == "wait_for_nodes" and self.missing == 0:
                self._begin_restart(t)
        else:
            self.spares += 1

    def on_rejoin(self, t: float, payload) -> None:  # replica groups only
        raise NotImplementedError

    def schedule_sites(self, heap: list) -> None:
        """Push the first site-outage events (replica groups across sites only)."""

    def on_site(self, t: float, payload) -> None:  # replica groups across sites only
        raise NotImplementedError

    def on_maintenance(self, t: float) -> None:
        if self.phase in ALIVE:
            self.work_storage = self.work_memory = self.work  # the job saves before the window
            self._start_maintenance(t)
        elif self.phase == "restart":
            self._start_maintenance(t)  # the relaunch is abandoned and redone after the window
        elif self.phase in ("detect", "outage", "wait_for_nodes"):
            self.maintenance_due = True  # the window starts when the job could restart

    def _start_maintenance(self, t: float) -> None:
        self.res.maintenance_windows += 1
        self.maintenance_due = False
        self.from_memory = False
        self._enter("maintenance", t, self.cfg.cluster.maintenance_s)


def run_events(job: Job, cfg: SimConfig, classes: list[FailureClass], seed: int) -> RunResult:
    """Drive `job` through cfg.sim.days of failures (drawn from `seed`), repairs, rejoins and maintenance."""
    horizon = cfg.sim.horizon_s
    times, kinds = sample_arrivals(classes, cfg.cluster, horizon, seed)
    positions: list[float] = sample_positions(len(times), seed).tolist()
    heap: list[tuple[float, int, object]] = []
    job.heap = heap
    every = cfg.cluster.maintenance_every_days * 86400.0
    if every > 0 and every < horizon:
        heapq.heappush(heap, (every, _MAINT, 0))
    job.schedule_sites(heap)
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
            job.on_failure(t_next, classes[kinds_list[i]], heap, positions[i])
            i += 1
        else:
            _, kind, payload = heapq.heappop(heap)
            if kind == _REPAIR:
                job.on_repair(t_next)
            elif kind == _REJOIN:
                job.on_rejoin(t_next, payload)
            elif kind == _SITE:
                job.on_site(t_next, payload)
            else:
                job.on_maintenance(t_next)
                heapq.heappush(heap, (t_next + every, _MAINT, 0))
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
