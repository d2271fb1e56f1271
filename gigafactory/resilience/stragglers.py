"""Straggler report: every rank's mean step time, gathered every N steps, with the slowest ranks named.

    monitor = StragglerMonitor(every=cfg.straggler_every, ratio=cfg.straggler_ratio, events=events)
    ...after each step, on every rank:  report = monitor.step_done(step, step_time_s)   # collective every N steps

The rank's own step time (forward + backward + optimizer, measured on the host) is what differs between ranks: the
slowest rank makes every collective wait, so the others' times converge to it and only the compute part before the
first blocking collective stands out. Use a step time measured to the first collective (or after a device sync)
where that matters; on CPU/gloo the plain step time is fine.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from gigafactory.resilience.events import EventLog


def straggler_report(times_by_rank: list[float], ratio: float = 1.2, top: int = 3) -> dict:
    """{median_s, slowest: [(rank, mean_s, x_median)...], stragglers: [ranks above ratio x median]}."""
    median = statistics.median(times_by_rank)
    order = sorted(range(len(times_by_rank)), key=lambda r: -times_by_rank[r])
    slowest = [(r, round(times_by_rank[r], 6), round(times_by_rank[r] / median, 3) if median > 0 else 0.0) for r in order[:top]]
    stragglers = [r for r in order if median > 0 and times_by_rank[r] > ratio * median]
    return {"median_s": round(median, 6), "slowest": slowest, "stragglers": stragglers, "per_rank_s": [round(t, 6) for t in times_by_rank]}


class StragglerMonitor:
    def __init__(self, every: int, ratio: float = 1.2, events: EventLog | None = None, top: int = 3, device: torch.device | str = "cpu"):
        self.every, self.ratio, self.events, self.top, self.device = every, ratio, events, top, torch.device(device)
        self._sum, self._n = 0.0, 0

    def step_done(self, step: int, step_time_s: float) -> dict | None:
        """Record one step; every `every` steps gather all ranks' means (collective) and return the report."""
        if self.every <= 0:
            return None
        self._sum += step_time_s
        self._n += 1
        if step % self.every:
            return None
        mean = self._sum / max(1, self._n)
        self._sum, self._n = 0.0, 0
        if dist.is_initialized():
            t = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=self.device)
            t[dist.get_rank()] = mean
            dist.all_reduce(t)  # device= must suit the default group: cuda for NCCL, cpu for gloo
            times = t.tolist()
        else:
            times = [mean]
        report = straggler_report(times, self.ratio, self.top)
        if self.events is not None:
            self.events.record("stragglers", once=True, step=step, **report)
        return report
