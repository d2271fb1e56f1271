"""Straggler hunting: each rank's compute time vs its wait at a per-step sync point, the slow rank named in a few steps.

    monitor = StragglerMonitor(every, ratio, events, device=..., policy="warn" | "exclude", run_dir=RUN_DIR)
    ...inside every step, on every rank, after the step's host-side preparation:  monitor.sync_point()
    ...after each step:  report = monitor.step_done(step, step_time_s)      # a small collective every `every` steps

Why a sync point: one slow rank makes every collective wait for it, so step times converge to the slowest rank's
and cannot tell who is slow. A tiny all-reduce (one number) at the same place in every step splits each rank's
cycle into *compute* (from leaving the previous sync point to arriving at this one: its own work, data loading, a
stall) and *wait* (time blocked in the sync point for the others). The straggler computes longest and waits least.
Every `every` steps the ranks' window medians (robust to one slow checkpoint or eval step) are gathered with one
all-reduce of 3 x world numbers; a rank whose compute median exceeds `ratio` x the fleet median is named in an
`straggler` event and on rank 0's console. Policy `exclude` also adds its host to RUN_DIR/bad_nodes.json, the file
`gigafactory launch --exclude` (and the generated job scripts at a restart) read.

What it sees: lag a rank builds up outside the model's own collectives (data loading, host stalls, a slow optimizer
step, a slow GPU under pure data parallelism). Under FSDP/TP a slow GPU also drags its peers inside the layer
collectives, which hides part of its lag from this split; `gigafactory health` (compute timed alone) catches that.
Cost: one 1-element all-reduce per step (on CUDA, plus a device sync there) and one small all-reduce per check.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gigafactory.resilience.events import EventLog

BAD_NODES_FILE = "bad_nodes.json"


def node_name() -> str:
    """The name the scheduler knows this machine by: Slurm's node name, the Kubernetes node (NODE_NAME from the
    downward API, set by the generated PyTorchJob), else the hostname."""
    for var in ("GIGAFACTORY_NODE_NAME", "SLURMD_NODENAME", "NODE_NAME"):
        if os.environ.get(var):
            return os.environ[var]
    return socket.gethostname()


def straggler_report(times_by_rank: list[float], ratio: float = 1.2, top: int = 3) -> dict:
    """{median_s, slowest: [(rank, time_s, x_median)...], stragglers: [ranks above ratio x median], per_rank_s}."""
    median = statistics.median(times_by_rank)
    order = sorted(range(len(times_by_rank)), key=lambda r: -times_by_rank[r])
    slowest = [(r, round(times_by_rank[r], 6), round(times_by_rank[r] / median, 3) if median > 0 else 0.0) for r in order[:top]]
    stragglers = [r for r in order if median > 0 and times_by_rank[r] > ratio * median]
    return {"median_s": round(median, 6), "slowest": slowest, "stragglers": stragglers, "per_rank_s": [round(t, 6) for t in times_by_rank]}


def add_bad_nodes(path: Path, hosts: dict[str, str]) -> list[str]:
    """Merge {host: why} into a bad-nodes JSON ({"bad_nodes": [...], "why": {...}}, what `launch --exclude` reads);
    returns the full list. Written to a temporary name and renamed, so a reader never sees half a file."""
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) and isinstance(data.get("bad_nodes"), list) else {}
    except (OSError, ValueError):
        data = {}
    bad = list(dict.fromkeys([*data.get("bad_nodes", []), *hosts]))
    why = {**data.get("why", {}), **hosts}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"bad_nodes": bad, "why": why}, indent=2) + "\n")
    os.replace(tmp, path)
    return bad


class StragglerMonitor:
    def __init__(self, every: int, ratio: float = 1.2, events: EventLog | None = None, top: int = 3, device: torch.device | str = "cpu",
                 policy: str = "warn", run_dir: Path | str | None = None, board_power=None):
        self.every, self.ratio, self.events, self.top, self.device = every, ratio, events, top, torch.device(device)
        self.policy, self.run_dir = policy, Path(run_dir) if run_dir else None
        self.board_power = board_power  # an object with read() -> W or None and .status (train.metrics.BoardPower)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._step_times: list[float] = []
        self._compute: list[float] = []
        self._wait: list[float] = []
        self._left_at: float | None = None
        self._one = torch.zeros(1, device=self.device)
        self._hosts: list[str] | None = None
        self.named: set[int] = set()  # ranks currently named as stragglers (named again only after they recover)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sync_point(self) -> None:
        """Every rank, once per step at the same place: time the arrival and the wait for the others."""
        if self.every <= 0 or self.world == 1:
            return
        self._sync()
        arrived = time.perf_counter()
        dist.all_reduce(self._one)
        self._sync()
        left = time.perf_counter()
        if self._left_at is not None:
            self._compute.append(arrived - self._left_at)
            self._wait.append(left - arrived)
        self._left_at = left

    def step_done(self, step: int, step_time_s: float) -> dict | None:
        """Record one step; every `every` steps gather all ranks' window medians (collective) and judge them."""
        if self.every <= 0:
            return None
        self._step_times.append(step_time_s)
        if step % self.every:
            return None
        watts = self.board_power.read() if self.board_power is not None else None
        mine = [statistics.fmean(self._step_times) if self._step_times else 0.0,
                statistics.median(self._compute) if self._compute else -1.0, statistics.median(self._wait) if self._wait else 0.0,
                -1.0 if watts is None else watts]
        self._step_times, self._compute, self._wait = [], [], []
        table = torch.zeros(self.world, 4, dtype=torch.float64, device=self.device)
        table[self.rank] = torch.tensor(mine, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(table)  # device= must suit the default group: cuda for NCCL, cpu for gloo
        step_s, compute_s, wait_s, board_w = (table[:, i].tolist() for i in range(4))
        measured = all(c >= 0 for c in compute_s)  # no sync point yet (or one process): judge whole step times
        report = straggler_report(compute_s if measured else step_s, self.ratio, self.top)
        report.update(judged="compute" if measured else "step", per_rank_step_s=[round(t, 6) for t in step_s],
                      per_rank_wait_s=[round(t, 6) for t in wait_s] if measured else [],
                      # board power per rank (W) where NVML reads it, null where it does not; never estimated
                      per_rank_board_w=[round(w, 1) if w >= 0 else None for w in board_w] if any(w >= 0 for w in board_w) else None,
                      board_power=self.board_power.status if self.board_power is not None else "absent: not read")
        if self.events is not None and (report["stragglers"] or step % (10 * self.every) == 0):
            self.events.record("stragglers", once=True, step=step, **report)
        if self._hosts is None:  # once, on every rank: the hosts the names and the bad-nodes file refer to
            self._hosts = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(self._hosts, node_name())
            else:
                self._hosts = [node_name()]
        self._name_new(step, report, wait_s)
        return report

    def _name_new(self, step: int, report: dict, wait_s: list[float]) -> None:
        slow = set(report["stragglers"])
        new = sorted(slow - self.named, key=lambda r: -report["per_rank_s"][r])
        self.named = slow
        if not new:
            return
        if self.rank != 0:
            return
        median, median_wait = report["median_s"], statistics.median(wait_s) if wait_s else 0.0
        why = {}
        for r in new:
            t = report["per_rank_s"][r]
            what = "computes" if report["judged"] == "compute" else "steps in"
            wait = f" and waits {wait_s[r]:.3f} s (median {median_wait:.3f} s)" if report["judged"] == "compute" else ""
            line = (f"straggler at step {step}: rank {r} on {self._hosts[r]} {what} {t:.3f} s/step, {t / median:.2f}x the median "
                    f"{median:.3f} s{wait} over the last {self.every} steps")
            why[self._hosts[r]] = line
            if self.events is not None:
                self.events.record("straggler", once=True, step=step, straggler_rank=r, host=self._hosts[r], time_s=t, median_s=median,
                                   x_median=round(t / median, 3) if median > 0 else 0.0, wait_s=wait_s[r] if wait_s else None,
                                   judged=report["judged"], policy=self.policy)
            print(f"gigafactory: {line}; policy {self.policy}", file=sys.stderr, flush=True)
        if self.policy == "exclude" and self.run_dir is not None:
            path = self.run_dir / BAD_NODES_FILE
            add_bad_nodes(path, why)
            print(f"gigafactory: {', '.join(why)} added to {path}: the next launch or restart leaves it out "
                  f"(gigafactory launch --exclude {path})", file=sys.stderr, flush=True)
