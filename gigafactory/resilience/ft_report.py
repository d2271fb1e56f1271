"""Summarise a fault-tolerant run (RUN_DIR/group0, group1, ...): who was in the quorum at each step, the steps run
with fewer groups, each group's failures and time to rejoin, and the run's ETTR, with a membership plot.

Each group directory is an ordinary run directory (metrics.jsonl, events.jsonl). A group's committed steps are its
metrics lines (the last one logged per step); a step's participants are the groups that logged it. ETTR here is the
share of the machine that trained: the productive step time summed over groups / (groups x wall time), so a step
run by one group of two counts half.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.resilience.events import read_events

FAILURE_CAUSES = ("fault_injected", "hang")


def group_dirs(run_dir: Path) -> list[Path]:
    dirs = [p for p in run_dir.glob("group*") if p.is_dir() and re.fullmatch(r"group\d+", p.name)]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def is_replica_run(run_dir: Path | str) -> bool:
    run_dir = Path(run_dir)
    return run_dir.is_dir() and not (run_dir / "metrics.jsonl").exists() and bool(group_dirs(run_dir))


@dataclass
class Rejoin:
    group: int
    failed_at_step: int
    healed_to_step: int
    rejoin_s: float  # failure (or the last heartbeat before it) -> state received from a live peer
    bytes: int


@dataclass
class ReplicaRunSummary:
    run_dir: str
    replica_groups: int
    steps: int  # distinct steps committed by any group
    steps_with_fewer_groups: int
    group_steps: dict[int, int]  # group -> steps it committed
    group_restarts: dict[int, int]
    rejoins: list[Rejoin]
    wall_s: float
    ettr: float
    membership: list[tuple[int, int]] = field(default_factory=list)  # (step, participants), where it changes
    plot: str | None = None


def _committed(group: Path) -> dict[int, dict]:
    path = group / "metrics.jsonl"
    steps: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a crash mid-write
            if isinstance(rec, dict) and "loss" in rec and isinstance(rec.get("step"), int) and isinstance(rec.get("time"), (int, float)):
                steps[rec["step"]] = rec
    return steps


def _rejoins(index: int, events: list[dict]) -> list[Rejoin]:
    out = []
    for heal in (e for e in events if e["event"] == "ft_heal"):
        before = [e for e in events if e.get("attempt", 0) < heal.get("attempt", 0) and e["time"] <= heal["time"]]
        causes = [e for e in before if e["event"] in FAILURE_CAUSES]
        restart = next((e for e in events if e["event"] == "restart" and e.get("attempt") == heal.get("attempt")), None)
        # the earliest sign of the failure: an injected fault, or a hang's start (detection time - stalled time)
        starts = [(e["time"] - float(e.get("stalled_s", 0.0)), e.get("step", 0)) for e in causes]
        failed_at, failed_step = min(starts) if starts else ((restart or {}).get("failed_at"), (restart or {}).get("last_step", 0))
        if failed_at is None:
            continue  # a group that started late and caught up: no failure to time
        out.append(Rejoin(index, int(failed_step), int(heal["to_step"]), round(heal["time"] - float(failed_at), 3), int(heal.get("bytes", 0))))
    return out


def build_replica_report(run_dir: Path | str, out_dir: Path | str | None = None, plots: bool = True) -> ReplicaRunSummary:
    run_dir = Path(run_dir)
    groups = group_dirs(run_dir)
    if not groups:
        raise UserError(f"'{run_dir}' has no group*/ directories: not a fault-tolerant run (use `gigafactory report` on a run directory)")
    committed = {int(g.name[5:]): _committed(g) for g in groups}
    events = {int(g.name[5:]): read_events(g / "events.jsonl") if (g / "events.jsonl").is_file() else [] for g in groups}
    if not any(committed.values()):
        raise UserError(f"no group under '{run_dir}' has logged a step yet (metrics.jsonl); train first")
    n_groups = max([len(groups)] + [e.get("replica_groups", 0) for evs in events.values() for e in evs if e["event"] == "ft_quorum"])
    participants: dict[int, int] = {}
    for steps in committed.values():
        for step in steps:
            participants[step] = participants.get(step, 0) + 1
    times = [r["time"] for steps in committed.values() for r in steps.values()] + [e["time"] for evs in events.values() for e in evs]
    wall = max(times) - min(times) if len(times) > 1 else 0.0
    productive = sum(float(r.get("step_time", 0.0)) for steps in committed.values() for r in steps.values())
    membership, last = [], None
    for step in sorted(participants):
        if participants[step] != last:
            membership.append((step, participants[step]))
            last = participants[step]
    summary = ReplicaRunSummary(
        run_dir=str(run_dir), replica_groups=n_groups, steps=len(participants),
        steps_with_fewer_groups=sum(1 for n in participants.values() if n < n_groups),
        group_steps={g: len(s) for g, s in committed.items()},
        group_restarts={g: sum(1 for e in evs if e["event"] == "restart") for g, evs in events.items()},
        rejoins=[r for g, evs in events.items() for r in _rejoins(g, evs)],
        wall_s=round(wall, 3), ettr=round(productive / (n_groups * wall), 4) if wall > 0 else 0.0, membership=membership,
    )
    if plots:
        out = Path(out_dir) if out_dir else run_dir / "report"
        summary.plot = str(_plot(committed, events, participants, n_groups, min(times), out))
    return summary


def _plot(committed: dict[int, dict], events: dict[int, list], participants: dict[int, int], n_groups: int, t0: float,
          out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out '{out}' is a file; give a directory for the plots") from None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), gridspec_kw={"height_ratios": [2, 1]})
    for g, steps in committed.items():
        spans = [(r["time"] - t0 - float(r.get("step_time", 0.0)), float(r.get("step_time", 0.0))) for r in steps.values()]
        top.broken_barh(spans, (g - 0.35, 0.7), color="tab:green")
        for e in events.get(g, []):
            if e["event"] in FAILURE_CAUSES:
                top.plot([e["time"] - t0], [g], "rx")
            elif e["event"] == "ft_heal":
                top.plot([e["time"] - t0], [g], "b>")
    top.set_yticks(range(n_groups), [f"group {g}" for g in range(n_groups)])
    top.set_xlabel("seconds (green: in the quorum, x: failure, >: rejoined from a peer)")
    xs = sorted(participants)
    bottom.step(xs, [participants[s] for s in xs], where="post")
    bottom.set_ylim(0, n_groups + 0.5)
    bottom.set_xlabel("step")
    bottom.set_ylabel("groups")
    fig.tight_layout()
    path = out / "membership.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_replica_summary(s: ReplicaRunSummary) -> str:
    lines = [
        f"run: {s.run_dir} ({s.replica_groups} replica groups)",
        f"steps: {s.steps} committed, {s.steps_with_fewer_groups} with fewer than {s.replica_groups} groups",
        "per group: " + ", ".join(f"group {g}: {n} steps, {s.group_restarts.get(g, 0)} restarts" for g, n in sorted(s.group_steps.items())),
        "membership (from step: groups): " + ", ".join(f"{step}: {n}" for step, n in s.membership),
    ]
    for r in s.rejoins:
        lines.append(f"group {r.group} failed at step {r.failed_at_step}, rejoined at step {r.healed_to_step} from a live peer "
                     f"after {r.rejoin_s:.1f} s ({r.bytes / 2**20:.1f} MiB of state)")
    lines.append(f"wall {s.wall_s:.1f} s, ETTR {s.ettr:.3f} (productive group-time / (groups x wall))")
    if s.plot:
        lines.append(f"plot: {s.plot}")
    return "\n".join(lines)


def replica_summary_json(s: ReplicaRunSummary) -> str:
    return json.dumps(asdict(s), indent=2)
