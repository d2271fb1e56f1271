"""The rollout as fleet policy: which pool serves a user, and the canary that moves each region through its phases.

A region is at phase k (-1 = before the first). A user is *in* phase k when listed in the `allow` of any phase up to k,
or when sha256(salt:user) maps below phase k's percent (serve.rollout.bucket: the same user always gets the same
answer, and a larger percent only adds users). Users in get phase k's pool; the others get the region's fallback pool
or a 403. Every attempt on the phase's pool is recorded; every `slo.evaluate_every_s` the controller looks at the last
`slo.window_s` of them:
- with at least `min_requests` and the error rate or p99 latency outside the SLO: roll back to phase k-1 and freeze
  (no automatic advance until an operator resumes);
- else, once phase k has run `hold_s` inside the SLO with at least `min_requests` and phase k+1's start time has come:
  advance.
The kill switch (admin endpoint or `killed = true` + SIGHUP) sends everyone to the fallback and freezes the region.
Each decision is one JSON line (decisions_log) and a log line; each region's phase survives restarts (state_file).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gigafactory.gateway.config import GatewayConfig, Region
from gigafactory.serve.rollout import bucket

log = logging.getLogger(__name__)


@dataclass
class RegionState:
    phase: int = -1
    since: float = 0.0  # when the phase began (wall clock)
    frozen: bool = False  # after a rollback or a kill: only an operator moves it
    killed: bool = False
    killed_by: str = ""  # "admin" | "config"


@dataclass(frozen=True)
class Assignment:
    pool: str | None  # None = refused
    phase: int
    canary: bool  # served by the current phase's pool (its outcome counts for the SLO)
    reason: str = ""


class SloWindow:
    """(time, ok, latency) of recent attempts on a region's canary pool."""

    def __init__(self):
        self.samples: collections.deque = collections.deque()

    def add(self, now: float, ok: bool, latency: float | None) -> None:
        self.samples.append((now, ok, latency))

    def stats(self, now: float, window_s: float) -> tuple[int, float, float]:
        """(requests, error rate, p99 latency of the successful ones) over the last window_s."""
        while self.samples and self.samples[0][0] < now - window_s:
            self.samples.popleft()
        n = len(self.samples)
        if not n:
            return 0, 0.0, 0.0
        errors = sum(1 for _, ok, _ in self.samples if not ok)
        lat = sorted(l for _, ok, l in self.samples if ok and l is not None)
        p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else 0.0
        return n, errors / n, p99


class Controller:
    def __init__(self, cfg: GatewayConfig, clock=time.time, metrics=None):
        self.cfg, self.clock, self.metrics = cfg, clock, metrics
        self.lock = threading.Lock()
        self.windows: dict[str, SloWindow] = collections.defaultdict(SloWindow)
        self.states: dict[str, RegionState] = {name: RegionState() for name in cfg.regions}
        self._load_state()
        self.apply_config(cfg, initial=True)

    # --- who gets what ---------------------------------------------------------------------------------------

    def assign(self, region_name: str, user: str | None) -> Assignment:
        region, st = self.cfg.regions[region_name], self.states[region_name]
        fallback = region.fallback or None
        if st.killed or st.phase < 0:
            why = "stopped by the operator" if st.killed else "not started yet"
            return Assignment(fallback, st.phase, False, f"Grok is not available in region {region_name} ({why}).")
        phase = region.phases[st.phase]
        allowed = any(user in p.allow for p in region.phases[:st.phase + 1]) if user else False
        if allowed or (user and bucket(self.cfg.salt, user) < phase.percent):
            return Assignment(phase.pool, st.phase, True)
        if fallback:
            return Assignment(fallback, st.phase, False)
        if not user:
            return Assignment(None, st.phase, False, f"Grok is rolling out in region {region_name} to some users; "
                                                     "send an API key (or a user id through your proxy) to check access.")
        return Assignment(None, st.phase, False, f"Grok is rolling out in region {region_name} to {phase.percent:g}% "
                                                 "of users; you are not yet included.")

    def record(self, region_name: str, ok: bool, latency: float | None) -> None:
        """One attempt on the region's canary pool: ok = answered without a server error."""
        with self.lock:
            self.windows[region_name].add(self.clock(), ok, latency)

    # --- the canary ------------------------------------------------------------------------------------------

    def evaluate(self) -> list[dict]:
        """Look at every region's window once; returns the decisions taken (also logged)."""
        decisions = []
        now, slo = self.clock(), self.cfg.slo
        with self.lock:
            for name, region in self.cfg.regions.items():
                st = self.states[name]
                if st.frozen or st.killed or not region.phases:
                    continue
                if st.phase < 0:
                    if now >= region.phases[0].start:
                        decisions.append(self._move(name, 0, "start", "phase 0's start time has come", now))
                    continue
                n, err, p99 = self.windows[name].stats(now, slo.window_s)
                seen = {"requests": n, "error_rate": round(err, 4), "p99_s": round(p99, 4)}
                if n >= slo.min_requests and (err > slo.max_error_rate or p99 > slo.max_p99_s):
                    why = (f"error rate {err:.1%} > {slo.max_error_rate:.1%}" if err > slo.max_error_rate
                           else f"p99 {p99:.3f} s > {slo.max_p99_s:g} s")
                    decisions.append(self._move(name, st.phase - 1, "rollback", why, now, freeze=True, **seen))
                    continue
                nxt = st.phase + 1
                if (nxt < len(region.phases) and n >= slo.min_requests and now - st.since >= slo.hold_s
                        and now >= region.phases[nxt].start):
                    decisions.append(self._move(name, nxt, "advance", f"inside the SLO for {now - st.since:.0f} s", now, **seen))
        return decisions

    def _move(self, region: str, phase: int, action: str, reason: str, now: float, freeze: bool = False, **seen) -> dict:
        st = self.states[region]
        entry = {"time": round(now, 3), "region": region, "action": action, "from_phase": st.phase, "to_phase": phase,
                 "reason": reason, **seen}
        st.phase, st.since = phase, now
        st.frozen = st.frozen or freeze
        self.windows[region] = SloWindow()  # the new phase is judged on its own traffic
        self._log(entry)
        return entry

    # --- operator actions ------------------------------------------------------------------------------------

    def act(self, action: str, region: str | None, by: str = "admin") -> list[dict]:
        """kill | resume | advance | rollback, for one region or (None) all of them."""
        names = [region] if region else list(self.cfg.regions)
        out, now = [], self.clock()
        with self.lock:
            for name in names:
                st, phases = self.states[name], self.cfg.regions[name].phases
                entry = {"time": round(now, 3), "region": name, "action": action, "from_phase": st.phase,
                         "to_phase": st.phase, "reason": f"by {by}"}
                if action == "kill":
                    st.killed, st.killed_by, st.frozen = True, by, True
                elif action == "resume":
                    st.killed, st.killed_by, st.frozen = False, "", False
                elif action in ("advance", "rollback"):
                    target = st.phase + (1 if action == "advance" else -1)
                    if not -1 <= target < len(phases):
                        continue
                    out.append(self._move(name, target, action, f"by {by}", now, freeze=action == "rollback"))
                    continue
                self._log(entry)
                out.append(entry)
        return out

    def apply_config(self, cfg: GatewayConfig, initial: bool = False) -> None:
        """A (re)loaded config: regions keep their phase (clamped to the new list); `killed` in the file kills or,
        when removed, lifts a kill that the file made."""
        with self.lock:
            self.cfg = cfg
            self.states = {name: self.states.get(name) or RegionState() for name in cfg.regions}
            for name, region in cfg.regions.items():
                st = self.states[name]
                st.phase = min(st.phase, len(region.phases) - 1)
                if region.killed and not st.killed:
                    st.killed, st.killed_by, st.frozen = True, "config", True
                    self._log({"time": round(self.clock(), 3), "region": name, "action": "kill", "from_phase": st.phase,
                               "to_phase": st.phase, "reason": "killed = true in the config"})
                elif not region.killed and st.killed and st.killed_by == "config":
                    st.killed, st.killed_by, st.frozen = False, "", False
                    self._log({"time": round(self.clock(), 3), "region": name, "action": "resume", "from_phase": st.phase,
                               "to_phase": st.phase, "reason": "killed removed from the config"})
            if not initial:
                self._save_state()
            self._gauge()

    def status(self) -> dict:
        now = self.clock()
        out = {}
        for name, region in self.cfg.regions.items():
            st = self.states[name]
            n, err, p99 = self.windows[name].stats(now, self.cfg.slo.window_s)
            phase = region.phases[st.phase] if 0 <= st.phase < len(region.phases) else None
            out[name] = {**asdict(st), "phases": len(region.phases), "pool": phase.pool if phase else None,
                         "percent": phase.percent if phase else 0, "fallback": region.fallback or None,
                         "window": {"requests": n, "error_rate": round(err, 4), "p99_s": round(p99, 4)}}
        return out

    # --- persistence -----------------------------------------------------------------------------------------

    def _log(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=False)
        log.info("rollout decision %s", line)
        if self.cfg.decisions_log:
            try:
                with open(self.cfg.decisions_log, "a") as f:
                    f.write(line + "\n")
            except OSError as err:
                log.error("cannot append to decisions_log %s: %s", self.cfg.decisions_log, err)
        self._save_state()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            for name, st in self.states.items():
                self.metrics.phase.labels(region=name).set(-2 if st.killed else st.phase)

    def _save_state(self) -> None:
        if not self.cfg.state_file:
            return
        path = Path(self.cfg.state_file)
        # a name of this process's own: several gateway pods may share the file (the last writer wins, whole)
        tmp = path.with_suffix(f"{path.suffix}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({n: asdict(s) for n, s in self.states.items()}, indent=1))
            tmp.replace(path)
        except OSError as err:
            log.error("cannot write state_file %s: %s", path, err)

    def _load_state(self) -> None:
        path = Path(self.cfg.state_file) if self.cfg.state_file else None
        if path is None or not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
            for name, raw in saved.items():
                if name in self.states:
                    self.states[name] = RegionState(int(raw["phase"]), float(raw["since"]), bool(raw["frozen"]),
                                                    bool(raw["killed"]), str(raw.get("killed_by", "")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error("state_file %s unreadable (%s); every region starts before its first phase", path, err)


def region_summary(region: Region) -> str:
    return ", ".join(f"{p.pool}@{p.percent:g}%" for p in region.phases) or "-"
