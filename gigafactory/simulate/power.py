"""Facility power of the simulated job over time: busy while it computes, near idle while it pauses for a
checkpoint, is down after a failure or restarts; the largest swing in MW and MW/s; and what the trainer's smoothing
(a floor of filler work while paused alive, a ramp at start-up) does to both and costs in energy.

Model (inputs and sources in docs/operations.md, "Power"): facility W = PUE x GPUs x (GPU board W + host W per GPU).
A GPU draws `gpu_busy_w` while the job computes and `gpu_idle_w` otherwise; the host's share is held constant (its
swing is small next to the GPUs'), so every swing here is the GPUs'. A synchronous job moves all its GPUs between
states within about one collective, so a change of state is a step that takes `transition_s`; MW/s = step /
transition_s. Smoothing: where the job's processes are alive but not computing (a checkpoint stall, a restart's
load, a replica-group reconfigure) they run filler work holding `power_floor` x busy board power; where they are
dead (detecting a failure, an outage, waiting for nodes, maintenance) nothing holds the floor, so a crash still
drops to idle. A start-up (the restarted processes taking up the floor, then training) rises at the rate that
would take idle to busy in `ramp_s`, instead of in one step.
Phases inside a run are rebuilt from the engine's timeline: compute for the checkpoint interval, then the stall.
Not modelled: power within a step (compute vs communication, see `gigafactory plan`), replica groups out of a run
(their share is counted busy), the extra time a throttled start-up takes (reported as `ramp_cost_s` instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError
from gigafactory.simulate.engine import RunResult

ALIVE_PAUSED = ("checkpoint", "restart", "reconfigure")  # processes alive, not computing: the floor can be held
DEAD = ("detect", "outage", "wait_for_nodes", "maintenance")


@dataclass
class PowerSpec:
    """Facility power model of `simulate --power` (defaults: H100 SXM in DGX H100 nodes)."""

    gpu_busy_w: float = knob(700.0, "GPU board power while the job computes, W (H100 SXM TDP: NVIDIA H100 datasheet; training runs near TDP: arXiv 2508.14318).")
    gpu_idle_w: float = knob(100.0, "GPU board power while the job does not compute, W (assumption, about 15 percent of TDP; measure yours with nvidia-smi or the trainer's board_power_w log).")
    host_w_per_gpu: float = knob(575.0, "Server power besides the GPUs, per GPU, W, held constant (DGX H100 datasheet: 10.2 kW max / 8 GPUs - 700 W).")
    pue: float = knob(1.2, "Facility power / IT power (cooling, power conversion); assumption for a modern liquid-cooled site.")
    transition_s: float = knob(1.0, "Seconds a synchronous job takes to move every GPU between busy and idle (assumption: about one step's collective).")
    power_floor: float = knob(0.0, "Smoothing: fraction of busy board power filler work holds while the job pauses alive (checkpoint, restart, reconfigure); the trainer's resilience.power_floor.")
    ramp_s: float = knob(0.0, "Smoothing: seconds over which power rises from the floor to busy after a restart; the trainer's resilience.power_ramp_s.")

    def validate(self) -> None:
        for name in ("gpu_busy_w", "gpu_idle_w", "host_w_per_gpu", "ramp_s"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.gpu_busy_w >= self.gpu_idle_w:
            raise UserError(f"gpu_busy_w={self.gpu_busy_w} must be >= gpu_idle_w={self.gpu_idle_w}")
        if not self.pue >= 1:
            raise UserError(f"pue={self.pue} must be >= 1 (facility power includes the IT power)")
        if not self.transition_s > 0:
            raise UserError(f"transition_s={self.transition_s} must be > 0")
        if not 0 <= self.power_floor <= 1:
            raise UserError(f"power_floor={self.power_floor} must be in [0, 1]")

    @property
    def smoothed(self) -> bool:
        return self.power_floor > 0 or self.ramp_s > 0

    def facility_mw(self, gpus: int, board_w: float) -> float:
        return self.pue * gpus * (board_w + self.host_w_per_gpu) / 1e6

    def board_w(self, state: str, smoothed: bool) -> float:
        if state == "compute":
            return self.gpu_busy_w
        if smoothed and state in ALIVE_PAUSED:
            return max(self.gpu_idle_w, self.power_floor * self.gpu_busy_w)
        return self.gpu_idle_w


def states(run: RunResult, interval_s: float, stall_s: float) -> list[tuple[float, float, str]]:
    """(t0, t1, state) over the run, each "run" phase split into compute and checkpoint stalls (its period starts
    when the run starts; a reconfigure pauses it without resetting that period)."""
    if not run.timeline:
        raise ValueError("run has no timeline; simulate with sim.timeline=True")
    period = interval_s + stall_s
    out: list[list] = []
    run_start, paused = None, 0.0
    for t0, t1, phase in run.timeline:
        if phase == "reconfigure":
            paused += t1 - t0
        elif phase != "run":
            run_start = None
        if phase != "run":
            _add(out, t0, t1, phase)
            continue
        if run_start is None:
            run_start, paused = t0, 0.0
        t = t0
        while t < t1:
            into = (t - run_start - paused) % period if period > 0 else 0.0
            if into < interval_s:
                end, state = t + (interval_s - into), "compute"
            else:
                end, state = t + (period - into), "checkpoint"
            end = min(max(end, t + 1e-9), t1)
            _add(out, t, end, state)
            t = end
    return [tuple(x) for x in out]


def _add(out: list[list], t0: float, t1: float, state: str) -> None:
    if out and out[-1][2] == state and abs(out[-1][1] - t0) < 1e-6:
        out[-1][1] = t1
    else:
        out.append([t0, t1, state])


def trace(spec: PowerSpec, gpus: int, segments: list[tuple[float, float, str]], smoothed: bool) -> list[tuple[float, float]]:
    """Facility MW as (t, MW) breakpoints of a piecewise-linear curve. Every change of level is a linear move over
    transition_s; when smoothing, a start-up (dead -> restart -> compute) rises at the rate that takes idle to busy
    in ramp_s. A state shorter than its move ends part-way, and the next one starts from there."""
    points: list[tuple[float, float]] = []
    prev_state = None
    for t0, t1, state in segments:
        target = spec.facility_mw(gpus, spec.board_w(state, smoothed))
        if not points:
            points.append((t0, target))
        level = points[-1][1]
        if target != level:
            move = spec.transition_s
            start_up = (prev_state in DEAD and state == "restart") or (prev_state == "restart" and state == "compute")
            if smoothed and spec.ramp_s > 0 and start_up and target > level:  # idle -> busy takes ramp_s
                full = spec.facility_mw(gpus, spec.gpu_busy_w) - spec.facility_mw(gpus, spec.gpu_idle_w)
                move = max(spec.transition_s, spec.ramp_s * (target - level) / full) if full > 0 else spec.transition_s
            reach = min(move, t1 - t0)
            level += (target - level) * reach / move
            if points[-1][0] < t0:
                points.append((t0, points[-1][1]))
            points.append((t0 + reach, level))
        if points[-1][0] < t1:
            points.append((t1, level))
        prev_state = state
    return points


def swings(points: list[tuple[float, float]], segments: list[tuple[float, float, str]]) -> dict:
    """Largest rise and drop (MW) and fastest change (MW/s), overall and by the change of state that caused it."""
    cause_at = {round(cur[0], 6): f"{prev[2]} -> {cur[2]}" for prev, cur in zip(segments, segments[1:])}
    by_cause: dict[str, dict] = {}
    for (ta, a), (tb, b) in zip(points, points[1:]):
        if tb <= ta or a == b:
            continue
        cause = by_cause.setdefault(cause_at.get(round(ta, 6), "?"), {"mw": 0.0, "mw_per_s": 0.0})
        cause["mw"] = max(cause["mw"], abs(b - a))
        cause["mw_per_s"] = max(cause["mw_per_s"], abs(b - a) / (tb - ta))
    rises = {c: v for c, v in by_cause.items() if _rises(c)}
    drops = {c: v for c, v in by_cause.items() if not _rises(c)}
    worst = lambda group: max(group.items(), key=lambda kv: kv[1]["mw"], default=("", {"mw": 0.0}))  # noqa: E731
    (rise_cause, rise), (drop_cause, drop) = worst(rises), worst(drops)
    return {"swing_mw": max(rise["mw"], drop["mw"]), "mw_per_s": max((v["mw_per_s"] for v in by_cause.values()), default=0.0),
            "rise_mw": rise["mw"], "rise_cause": rise_cause, "drop_mw": drop["mw"], "drop_cause": drop_cause,
            "by_cause": dict(sorted(by_cause.items(), key=lambda kv: -kv[1]["mw"]))}


def _rises(cause: str) -> bool:
    return cause.endswith("-> compute")


def energy_mwh(points: list[tuple[float, float]]) -> float:
    return sum((tb - ta) * (a + b) / 2 for (ta, a), (tb, b) in zip(points, points[1:])) / 3600.0


def power_report(spec: PowerSpec, runs: list[RunResult], gpus: int, interval_s: float, stall_s: float) -> dict:
    """Swings and energy, the worst seed's swing and the mean energy, unsmoothed and (if asked) smoothed."""
    spec.validate()
    out = {"inputs": dict(vars(spec), gpus=gpus), "busy_mw": spec.facility_mw(gpus, spec.gpu_busy_w),
           "idle_mw": spec.facility_mw(gpus, spec.gpu_idle_w)}
    variants = (("plain", False), ("smoothed", True)) if spec.smoothed else (("plain", False),)
    for name, smoothed in variants:
        per_run = []
        for run in runs:
            segments = states(run, interval_s, stall_s)
            points = trace(spec, gpus, segments, smoothed)
            per_run.append((swings(points, segments), energy_mwh(points), segments))
        worst = max((s for s, _, _ in per_run), key=lambda s: (s["swing_mw"], s["mw_per_s"]))
        out[name] = dict(worst, energy_mwh=sum(e for _, e, _ in per_run) / len(per_run))
    if spec.smoothed:
        extra = out["smoothed"]["energy_mwh"] - out["plain"]["energy_mwh"]
        restarts = sum(sum(1 for a, b in zip(seg, seg[1:]) if a[2] == "restart" and b[2] == "compute") for _, _, seg in per_run) / len(runs)
        out["smoothing_cost"] = {
            "extra_energy_mwh": extra, "extra_energy_fraction": extra / out["plain"]["energy_mwh"] if out["plain"]["energy_mwh"] else 0.0,
            # training ramps from the floor f to full speed over (1-f) x ramp_s at (1+f)/2 speed on average
            "ramp_cost_s": restarts * spec.ramp_s * (1 - spec.power_floor) ** 2 / 2, "restarts": restarts,
        }
    return out
