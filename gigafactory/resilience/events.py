"""The recovery-events log: one JSON object per line in `RUN_DIR/events.jsonl`, appended by every rank.

Each record has `time` (wall clock), `event`, `rank`, `attempt` (torchrun's TORCHELASTIC_RESTART_COUNT) and event
fields. Records are written with one `write()` on an O_APPEND descriptor, so lines from different ranks never
interleave on a local filesystem. Events every rank would log identically (a checkpoint saved) pass `once=True`
and are written by rank 0 only.

Event kinds written by the resilience modules (`gigafactory report` reads them):
  start                 a training attempt began (world_size, tokens_per_step, resumed_step)
  restart               an attempt began after a failure: failed_at (last heartbeat), detected_at, restart_at,
                        steps_lost, downtime_s, what (the failure event of the previous attempt, if any was logged)
  finish                training reached its last step
  hang                  the watchdog found no step completed for timeout_s (the rank then exits)
  fault_injected        a FaultInjector fired (kind, step)
  nan / spike           an anomaly and the action taken (skip | rollback | stop)
  transient_fault       an anomaly gone on a re-run of the same batch (step, reason, first_loss, loss)
  rollback              state reloaded from a checkpoint (from_step, to_step, steps_lost, batches_skipped)
  signal                SIGTERM/SIGINT received (signal, step, grace_s); the run saves and exits
  checkpoint_saved / checkpoint_failed / checkpoint_corrupt / checkpoint_unverified
  stragglers            per-rank compute and wait medians over a window, the slowest ranks, board power (NVML)
  resume                a checkpoint was loaded (step, path, source: disk | memory)
  ft_quorum             fault tolerance: this replica group's quorum changed (group, step, participants)
  ft_heal               fault tolerance: this group received its state from a live peer (from_step, to_step, bytes)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from gigafactory.resilience.heartbeat import attempt, read_heartbeat


class EventLog:
    """Append-only JSONL writer shared by all ranks. `record(event, once=False, **fields)` returns the record.

    With `echo`, events an operator must see (a skipped checkpoint, a rollback, a failed save, ...) are also printed
    as one line on stderr by the rank that writes them."""

    def __init__(self, path: Path | str | None, rank: int = 0, enabled: bool = True, echo: bool = False):
        self.path = Path(path) if path else None
        self.rank, self.echo = rank, echo
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, once: bool = False, **fields) -> dict:
        rec = {"time": time.time(), "event": event, "rank": self.rank, "attempt": attempt(), **fields}
        if self.echo and not (once and self.rank != 0) and (line := describe(rec)):
            print(f"gigafactory: {line}", file=sys.stderr, flush=True)
        if self.enabled and not (once and self.rank != 0):
            line = (json.dumps(rec, default=_jsonable) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)  # the process may be SIGKILLed or os._exit right after a failure record
            finally:
                os.close(fd)
        return rec

    __call__ = record  # an EventLog can be passed wherever a log_event callable is expected


_DESCRIBE = {
    "checkpoint_corrupt": "checkpoint {path} is unusable ({problems}); falling back to an older one",
    "checkpoint_unverified": "checkpoint {path} has no manifest; loading it unverified",
    "checkpoint_failed": "checkpoint save at step {step} failed ({reason}); the previous checkpoint is intact",
    "rollback": "rolled back from step {from_step} to step {to_step} ({steps_lost} steps lost, {batches_skipped} batches skipped)",
    "transient_fault": "step {step}: {reason} on the first run, clean on a re-run of the same batch (transient fault); kept the re-run",
    "nan": "step {step}: NaN/Inf loss or gradient norm -> {action}",
    "spike": "step {step}: loss spike {loss:.4g} (z={zscore:.1f}) -> {action}",
    "restart": "restarted after a failure at step {last_step} ({what}); resuming at step {resumed_step}",
    "signal": "{signal} received: finishing step {step}, saving and exiting (at most {grace_s:g} s)",
    "ft_heal": "replica group {group} rejoined from a live replica group: step {from_step} -> {to_step}, {bytes} bytes of state in {quorum_s:.2f} s",
    "ft_quorum": "replica group {group}, step {step}: {participants} of {replica_groups} replica groups in the quorum",
}


def describe(rec: dict) -> str | None:
    """One human line for an event worth printing on the console, or None."""
    template = _DESCRIBE.get(rec.get("event", ""))
    if template is None:
        return None
    fields = {k: ("; ".join(map(str, v[:3])) if isinstance(v, list) else v) for k, v in rec.items()}
    try:
        return template.format(**fields)
    except (KeyError, ValueError, TypeError):
        return f"{rec['event']}: " + ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("time", "event", "attempt"))


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def read_events(path: Path | str) -> list[dict]:
    """All records of an events file, oldest first; unreadable lines (a torn last line) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time", 0.0))


def record_start(log: EventLog, heartbeat_path: Path | str | None, resumed_step: int, world_size: int, tokens_per_step: int) -> dict | None:
    """Call on every rank right after resuming (before the first step). Logs `start` and, when the previous
    attempt died before finishing (its heartbeat shows a step beyond the checkpoint, or torchrun restarted us),
    a `restart` record with the steps and time lost. Returns the restart record, or None."""
    log.record("start", once=True, resumed_step=resumed_step, world_size=world_size, tokens_per_step=tokens_per_step)
    beat = read_heartbeat(heartbeat_path) if heartbeat_path else None
    if beat is None or beat.get("finished"):
        return None
    last_step = int(beat.get("step", resumed_step))
    if attempt() == 0 and last_step <= resumed_step:
        return None  # a clean stop (Ctrl-C saved a checkpoint) resumed by hand: nothing was lost
    now = time.time()
    previous = [e for e in read_events(log.path) if e.get("attempt") == beat.get("attempt") and e["event"] in ("hang", "fault_injected", "nan", "spike", "checkpoint_failed")] if log.path else []
    cause = previous[-1] if previous else None
    failed_at = float(beat.get("time", now))
    detected_at = float(cause["time"]) if cause and cause["event"] == "hang" else failed_at
    return log.record(
        "restart", once=True, what=(cause or {}).get("kind") or (cause or {}).get("event") or "process exited (see the torchrun log)",
        failed_rank=(cause or {}).get("rank"), previous_attempt=beat.get("attempt"), last_step=last_step, resumed_step=resumed_step,
        steps_lost=max(0, last_step - resumed_step), failed_at=failed_at, detected_at=detected_at, restart_at=now,
        downtime_s=round(now - failed_at, 3),
    )
