"""Replica-group recovery (torchft): a failure drops only the replica groups it strikes; the others keep stepping.

Per absorbed failure the survivors lose the step in flight (should_commit fails, the step is redone) and stop for
detection (crash: `ft_detect_s`; hang: `ft_timeout_s`) plus one quorum change; while a group is out the job trains at
(live groups / groups). The struck group is declared dead after its class's `detect_s`, restarts on spare nodes
(`group_restart_s`; without spares it waits for repair while the others go on), and rejoins: the survivors stop for
one more quorum change while a live peer sends it the state over the scale-out network (`RecoverySpec.transfer_s`).

What torchft cannot absorb falls back to the job-restart path of engine.Job: a per-job class (storage, scheduler), a
fault that spreads to every replica (silent data corruption), a failure that leaves fewer than `min_replicas` live
groups (the last group, or a block of nodes touching every group).
Sites (`groups_per_site`, `site_outages_per_year`, `site_repair_h`): each site alternates up (exponential, mean one
year / rate) and down (the repair time); an outage drops its groups at once, like a failure striking them all, and
they stay out until the site is back, then restart and rejoin from a live peer. If the outage leaves fewer than
`min_replicas` live groups the job restarts, waiting for the site like for missing nodes. Under DiLoCo/LocalSGD
(`sync_every` = H) a group failure drops the whole interval in flight, up to H steps, not one step.
The restart loads the in-memory peer snapshot (taken every step) when `in_memory_recovery` is on and some copy
survives (the failure took no node, or spared a group), else the newest durable checkpoint.
"""

from __future__ import annotations

import heapq

import numpy as np

from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.config import DAY_S
from gigafactory.simulate.engine import _REJOIN, _REPAIR, _SITE, ALIVE, Job
from gigafactory.simulate.failures import FailureClass

SITE = "site"  # the cause name of site outages in the results


class ReplicaJob(Job):
    """Job plus the replica groups that are out (restarting, or waiting for a repaired node)."""

    def __init__(self, cfg: SimConfig, classes: list[FailureClass], interval_s: float, seed: int):
        self.rec = cfg.recovery
        self.groups = cfg.groups
        self.nodes = cfg.cluster.nodes
        self.step = cfg.job.step_time_s * self.rec.sync_every  # the unit of work a group failure discards
        self.per_site = self.rec.groups_per_site
        self.site_rate_per_s = self.rec.site_outages_per_year / (365.0 * DAY_S)
        self.sites_down: set[int] = set()
        self.site_rng = np.random.default_rng([seed, 0x517E])  # its own stream: the node failures stay the same
        self.out: set[int] = set()  # groups not stepping
        self.waiting: dict[int, int] = {}  # group -> nodes it still needs (no spare was left), oldest first
        self.ready_at: dict[int, float] = {}  # group -> when it can rejoin
        self.ticket = 0  # stamps rejoin events; a newer schedule (or a job restart) voids older ones
        self.valid: dict[int, int] = {}
        self.step_origin = 0.0  # compute time at which the current run's steps began (after the last pause)
        super().__init__(cfg, classes, interval_s, seed)
        self.res.groups = self.groups
        if self.site_rate_per_s > 0:
            self.res.interruptions[SITE] = self.res.arrivals[SITE] = 0

    # -- where a failure strikes ----------------------------------------------------------------------------------
    def _group(self, node: int) -> int:
        return node * self.groups // self.nodes

    def _block(self, cls: FailureClass, position: float) -> range:
        """The neighbouring nodes one failure takes out (a per-job class takes none)."""
        if cls.per == "job":
            return range(0)
        n = min(cls.nodes_affected, self.nodes)
        start = int(position * (self.nodes - n + 1))
        return range(start, start + n)

    def _hit(self, cls: FailureClass, block: range) -> list[int]:
        if cls.per == "job":
            return list(range(self.groups))
        return list(range(self._group(block[0]), self._group(block[-1]) + 1))

    # -- overrides of the job-restart path --------------------------------------------------------------------------
    def _take_nodes(self, t: float, cls: FailureClass, heap: list, position: float) -> None:
        if cls.repair_s <= 0:
            return
        for node in self._block(cls, position):
            heapq.heappush(heap, (t + cls.repair_s, _REPAIR, 0))
            if self.spares > 0:
                self.spares -= 1
            else:
                g = self._group(node)
                self.waiting[g] = self.waiting.get(g, 0) + 1

    def _memory_survives(self, cls: FailureClass, position: float) -> bool:
        if not self.in_memory or cls.spreads:
            return False
        return cls.per == "job" or len(self._hit(cls, self._block(cls, position))) < self.groups

    def _partial_step(self) -> float:
        """Compute time of the step in flight (0 while paused or in a checkpoint stall)."""
        if self.phase != "run":
            return 0.0
        elapsed = self.t - self.run_start
        k = elapsed // self.period
        if elapsed - k * self.period >= self.tau:
            return 0.0
        c = self._compute_now()
        return min((c - self.step_origin) % self.step, c - k * self.tau)  # a checkpoint ends a step

    def _memory_work(self) -> float:
        """The in-memory snapshot is the newest finished step."""
        if self.phase not in ALIVE:
            return self.work
        c = self._compute_now()
        return self._work_at(max(0.0, c - self._partial_step()))

    def _unavailable(self) -> set[int]:
        """Groups that cannot run: waiting for repaired nodes, or in a site that is down."""
        return set(self.waiting) | {g for g in range(self.groups) if g // self.per_site in self.sites_down}

    def _nodes_missing(self) -> bool:
        return self.groups - len(self._unavailable()) < self.rec.min_replicas

    def _restarted(self, t: float) -> None:
        """A job restart relaunches every group that has its nodes and its site; pending rejoins are void."""
        self.out = self._unavailable()
        self.valid.clear()
        self.rate = (self.groups - len(self.out)) / self.groups
        self.step_origin = 0.0
        super()._restarted(t)

    def end_phase(self, t: float) -> None:
        if self.phase == "reconfigure":
            self.step_origin = self._compute_now()  # the discarded step starts again after the pause
        super().end_phase(t)

    # -- events ----------------------------------------------------------------------------------------------------
    def on_failure(self, t: float, cls: FailureClass, heap: list, position: float) -> None:
        if not self._arrive(t, cls, heap, position):
            return
        hit = self._hit(cls, self._block(cls, position))
        recoverable = self._memory_survives(cls, position)
        if self.phase not in ALIVE:
            self._kill(t, cls, recoverable)
            return
        live_hit = [g for g in hit if g not in self.out]
        if cls.per == "job" or cls.spreads or self.groups - len(self.out) - len(live_hit) < self.rec.min_replicas:
            self._kill(t, cls, recoverable)
            return
        for g in hit:
            self._schedule(g, t + cls.detect_s + self.rec.group_restart_s)
        if not live_hit:  # it struck only groups that were already out
            self.res.while_down += 1
            return
        self.res.interruptions[cls.name] += 1
        lost = self.work - self._work_at(max(0.0, self._compute_now() - self._partial_step()))
        self.res.lost_s += lost
        self.out.update(live_hit)
        self._breakpoint(self.work - lost, (self.groups - len(self.out)) / self.groups)
        if self.record:
            self.res.failures.append((t, cls.name))
        self._pause(t, self.rec.survivor_stall_s(cls.hangs))

    def on_repair(self, t: float) -> None:
        if not self.waiting:
            self.spares += 1
            return
        g = next(iter(self.waiting))
        self.waiting[g] -= 1
        if self.waiting[g]:
            return
        del self.waiting[g]
        if self.phase in ALIVE and g in self.out:
            self._schedule(g, t + self.rec.group_restart_s)
        elif self.phase == "wait_for_nodes" and not self._nodes_missing():
            self._begin_restart(t)

    def on_rejoin(self, t: float, payload) -> None:
        g, ticket = payload
        if self.valid.get(g) != ticket or g not in self.out or self.phase not in ALIVE:
            return  # voided, or the job is down: the group comes back with the job's restart
        del self.valid[g]
        self.out.discard(g)
        self.res.rejoins += 1
        self._breakpoint(self.work, (self.groups - len(self.out)) / self.groups)
        self._pause(t, self.rec.rejoin_stall_s())

    def _schedule(self, g: int, ready: float) -> None:
        """The group can rejoin at `ready` (later if it was already due later); none while it waits for nodes or
        its site is down."""
        if g in self.waiting or g // self.per_site in self.sites_down:
            self.valid.pop(g, None)
            return
        ready = max(ready, self.ready_at.get(g, 0.0)) if g in self.valid else ready
        self.ready_at[g] = ready
        self.ticket += 1
        self.valid[g] = self.ticket
        heapq.heappush(self.heap, (ready, _REJOIN, (g, self.ticket)))

    def _pause(self, t: float, length: float) -> None:
        """Survivors stop (detection, quorum change, peer transfer); the run resumes where it stopped."""
        if self.phase == "run":
            self.pause_t = t
            self.phase, self.phase_end = "reconfigure", t + length
        elif self.phase == "reconfigure":
            self.phase_end = max(self.phase_end, t + length)

    # -- site outages ------------------------------------------------------------------------------------------------
    def schedule_sites(self, heap: list) -> None:
        if self.site_rate_per_s > 0:
            for site in range(self.groups // self.per_site):
                self._next_outage(heap, 0.0, site)

    def _next_outage(self, heap: list, t: float, site: int) -> None:
        heapq.heappush(heap, (t + self.site_rng.exponential(1.0 / self.site_rate_per_s), _SITE, (site, "down")))

    def on_site(self, t: float, payload) -> None:
        site, what = payload
        groups = range(site * self.per_site, (site + 1) * self.per_site)
        if what == "up":
            self.sites_down.discard(site)
            self._next_outage(self.heap, t, site)
            if self.phase in ALIVE:
                for g in groups:
                    if g in self.out:
                        self._schedule(g, t + self.rec.group_restart_s)
            elif self.phase == "wait_for_nodes" and not self._nodes_missing():
                self._begin_restart(t)
            return
        self.res.arrivals[SITE] += 1
        self.sites_down.add(site)
        heapq.heappush(self.heap, (t + self.rec.site_repair_h * 3600.0, _SITE, (site, "up")))
        for g in groups:
            self.valid.pop(g, None)  # a rejoin already scheduled cannot happen while the site is down
        live_hit = [g for g in groups if g not in self.out]
        if self.phase not in ALIVE or not live_hit:
            self.res.while_down += 1
            return
        if self.groups - len(self.out) - len(live_hit) < self.rec.min_replicas:
            self.res.interruptions[SITE] += 1
            self.res.job_restarts += 1
            self._kill_for_site(t)
            return
        self.res.interruptions[SITE] += 1
        lost = self.work - self._work_at(max(0.0, self._compute_now() - self._partial_step()))
        self.res.lost_s += lost
        self.out.update(live_hit)
        self._breakpoint(self.work - lost, (self.groups - len(self.out)) / self.groups)
        if self.record:
            self.res.failures.append((t, SITE))
        self._pause(t, self.rec.survivor_stall_s(hangs=False))

    def _kill_for_site(self, t: float) -> None:
        """Too few groups left: the job stops (rolled back to its newest checkpoint, the in-memory one if a group
        that holds it survives) and restarts once enough groups have their site and nodes."""
        recoverable = self.in_memory and len(self._unavailable()) < self.groups
        self._roll_back(t, SITE, recoverable)
        self.from_memory = recoverable
        self._enter("detect", t, self.rec.ft_detect_s)
