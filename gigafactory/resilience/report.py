"""Summarise a run directory: steps, tokens, failures, time lost, ETTR (the plots and the page: report_files.py).

Inputs: RUN_DIR/metrics.jsonl (train lines {"step","time","loss","grad_norm","lr","aux_loss","tokens_per_s","mfu",
"skipped"} and eval lines {"step","time","eval_loss"}; an optional "step_time" key is used when present) and
RUN_DIR/events.jsonl (see gigafactory.resilience.events). A torn line (a crash mid-write) is skipped; a file with no
readable record, a record without a numeric "time"/"step", or a file path instead of a run directory is a UserError.

After a restart or rollback the same step numbers are logged again: the attempt that counts is the last one logged for
each step. Only that one is summarised and drawn; the superseded log lines are counted in `rerun_records` and the steps
re-run in `steps_lost` (from the restart/rollback events, or from the rewinds in metrics.jsonl when they say more).

A skipped step (NaN/Inf or loss spike with on_nan / on_spike = skip) applied no optimizer update: it is counted in
`skipped_steps` (metrics "skipped" flags and skip events, minus steps later re-run) and when every step was skipped
the summary says so first.

ETTR (effective training time ratio) = productive step time / wall time. Productive time counts each step that
survives in the final model once and applied an update: steps re-run after a restart or rollback count only for their
last run; skipped steps do not count. Step time is "step_time" if logged, else tokens_per_step / tokens_per_s
(tokens_per_step from the `start` event, else from the config.toml with data parallel 1). Wall time runs from the first
record to the last. Time lost = wall - productive.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.resilience.events import read_events

FAILURE_EVENTS = ("restart",)
ANOMALY_EVENTS = ("nan", "spike", "transient_fault", "hang", "rollback", "checkpoint_failed", "fault_injected", "signal")


@dataclass
class RunSummary:
    run_dir: str
    steps: int = 0
    tokens: int = 0
    tokens_per_step: int = 0
    wall_s: float = 0.0
    productive_s: float = 0.0
    lost_s: float = 0.0
    ettr: float = 0.0
    attempts: int = 1
    failures: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    checkpoint_problems: list[dict] = field(default_factory=list)
    steps_lost: int = 0
    rerun_records: int = 0
    skipped_steps: int = 0
    all_skipped: bool = False
    unsaved_steps: int = 0  # an unfinished run: steps after its newest committed checkpoint
    last_checkpoint: int | None = None
    final_loss: float | None = None
    final_eval_loss: float | None = None
    stragglers: dict | None = None
    plots: list[str] = field(default_factory=list)
    html: str = ""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value, default: int = 0) -> int:
    return int(value) if is_number(value) and math.isfinite(value) else default


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not a text file (JSON lines expected); is it a log written by `gigafactory train`?") from None
    except OSError as err:
        raise UserError(f"cannot read '{path}': {err.strerror or err}") from None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl in file order; step is made an int."""
    train, evals, bad = [], [], 0
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1  # a torn line
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        key = "loss" if "loss" in rec else "eval_loss" if "eval_loss" in rec else None
        if key is None:
            continue
        for name, ok in (("time", is_number(rec.get("time"))), ("step", is_number(rec.get("step")) and float(rec["step"]).is_integer()),
                         (key, is_number(rec.get(key)))):
            if not ok:
                raise UserError(f"'{path}' line {n} has no numeric \"{name}\" field (expected {{\"step\", \"time\", \"{key}\", ...}}); "
                                "was it written by `gigafactory train`?")
        rec["step"] = int(rec["step"])
        (train if key == "loss" else evals).append(rec)
    if bad and not train and not evals:
        raise UserError(f"'{path}' holds no metrics records ({bad} unreadable line(s)); is it a metrics.jsonl written by `gigafactory train`?")
    return train, evals


def read_run_events(path: Path) -> list[dict]:
    if path.is_file():
        _read_text(path)  # undecodable or unreadable: one clear line, not a traceback
    return [e for e in read_events(path) if is_number(e.get("time"))]


def _run_dir(run_dir: Path | str) -> Path:
    path = Path(run_dir).expanduser()
    what = "; pass the logging.run_dir of a `gigafactory train` run"
    if path.is_file():
        hint = f", e.g. its directory '{path.parent}'" if path.suffix == ".jsonl" else what
        raise UserError(f"'{path}' is a file; `gigafactory report` expects a run directory{hint}")
    if not path.exists():
        raise UserError(f"run directory '{path}' does not exist{what}")
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory{what}")
    return path


def last_per_step(records: list[dict]) -> list[dict]:
    """The attempt that counts: the last record logged (by time) for each step, in step order."""
    last: dict[int, dict] = {}
    for rec in sorted(records, key=lambda r: r["time"]):
        last[rec["step"]] = rec
    return [last[k] for k in sorted(last)]


def _rewound_steps(train: list[dict]) -> int:
    """Steps logged again after a rewind (restart or rollback), from metrics.jsonl alone (a lower bound)."""
    lost, prev = 0, 0
    for rec in sorted(train, key=lambda r: r["time"]):
        if rec["step"] <= prev:
            lost += prev - rec["step"] + 1
        prev = rec["step"]
    return lost


def _skipped(train: list[dict], events: list[dict]) -> set[int]:
    """Steps whose update was skipped and that were not re-run since (a rewind forgets the steps after it)."""
    items = [(r["time"], 1, r, None) for r in train] + [(e["time"], 0, None, e) for e in events]
    skipped: set[int] = set()
    for _, _, rec, e in sorted(items, key=lambda i: (i[0], i[1])):
        if rec is not None:
            (skipped.add if rec.get("skipped") else skipped.discard)(rec["step"])
            continue
        back = e.get("to_step") if e["event"] == "rollback" else e.get("resumed_step") if e["event"] in ("start", "restart") else None
        if is_number(back):
            skipped = {k for k in skipped if k <= back}
        elif e["event"] in ("nan", "spike") and e.get("action") == "skip" and is_number(e.get("step")):
            skipped.add(int(e["step"]))
    return skipped


def _tokens_per_step(run_dir: Path, events: list[dict]) -> int:
    for e in reversed(events):
        if e["event"] == "start" and is_number(e.get("tokens_per_step")) and e["tokens_per_step"] > 0:
            return int(e["tokens_per_step"])
    try:
        import tomllib

        cfg = tomllib.loads((run_dir / "config.toml").read_text())
        t, d = cfg.get("training", {}), cfg.get("data", {})
        return int(t.get("batch_size", 0)) * int(t.get("grad_accum_steps", 1)) * int(d.get("seq_len", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _step_time(rec: dict, tokens_per_step: int) -> float:
    if is_number(rec.get("step_time")):
        return float(rec["step_time"])
    if is_number(rec.get("tokens_per_s")) and rec["tokens_per_s"] > 0 and tokens_per_step:
        return tokens_per_step / rec["tokens_per_s"]
    return 0.0


def load(run_dir: Path | str, events_file: str = "events.jsonl") -> tuple[Path, list[dict], list[dict], list[dict]]:
    """(run dir, train records, eval records, events), or a UserError naming what is missing or unreadable."""
    run_dir = _run_dir(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"'{run_dir}' has no metrics.jsonl; is it the logging.run_dir of a `gigafactory train` run?")
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    events = read_run_events(run_dir / events_file)
    if not train and not evals and not events:
        raise UserError(f"'{run_dir}' has no metrics.jsonl or {events_file} records yet; is it the logging.run_dir of a training run?")
    return run_dir, train, evals, events


def summarise(run_dir: Path | str, events_file: str = "events.jsonl") -> RunSummary:
    run_dir, train, evals, events = load(run_dir, events_file)
    s = RunSummary(run_dir=str(run_dir))
    s.tokens_per_step = _tokens_per_step(run_dir, events)
    survivors = last_per_step(train)
    s.rerun_records = len(train) - len(survivors)
    s.steps = survivors[-1]["step"] if survivors else 0
    skipped = {k for k in _skipped(train, events) if 0 < k <= s.steps}
    saved = [_int(e.get("step")) for e in events if e["event"] == "checkpoint_saved" and is_number(e.get("step"))]
    s.last_checkpoint = saved[-1] if saved else None
    last_start = max((e["time"] for e in events if e["event"] == "start"), default=None)
    finished = any(e["event"] == "finish" and (last_start is None or e["time"] >= last_start) for e in events)
    failed_later = any(e["event"] == "checkpoint_failed" and _int(e.get("step"), -1) > (s.last_checkpoint or 0) for e in events)
    if failed_later and not finished:  # ended after a failed save: the work past the newest checkpoint is not durable
        s.unsaved_steps = max(0, s.steps - (s.last_checkpoint or 0))
    s.skipped_steps = len(skipped)
    s.all_skipped = s.steps > 0 and (s.skipped_steps >= s.steps or all(r.get("skipped") for r in survivors))
    unproductive = skipped | set(range(s.steps - s.unsaved_steps + 1, s.steps + 1))
    prev_step = 0
    for rec in survivors:  # unlogged steps between log lines take the step time of the next logged one
        updates = rec["step"] - prev_step - sum(1 for k in unproductive if prev_step < k <= rec["step"])
        s.productive_s += _step_time(rec, s.tokens_per_step) * max(0, updates)
        prev_step = rec["step"]
    s.tokens = s.steps * s.tokens_per_step
    times = [r["time"] for r in train + evals] + [e["time"] for e in events]
    starts = [e["time"] for e in events if e["event"] == "start"]
    if starts:
        begin = min(starts)
    elif train:  # no events: the first metrics line is written at the end of its step(s)
        first = min(train, key=lambda r: r["time"])
        begin = min(times) - _step_time(first, s.tokens_per_step) * first["step"]
    else:
        begin = min(times, default=0.0)
    s.wall_s = max(max(times) - begin, s.productive_s) if times else 0.0
    s.lost_s = max(0.0, s.wall_s - s.productive_s)
    s.ettr = s.productive_s / s.wall_s if s.wall_s > 0 else 0.0
    s.attempts = 1 + len({e.get("attempt") for e in events} - {0, None})
    s.failures = [e for e in events if e["event"] in FAILURE_EVENTS]
    logged_lost = sum(_int(e.get("steps_lost")) for e in events if e["event"] in ("restart", "rollback"))
    s.steps_lost = max(logged_lost, _rewound_steps(train))
    s.anomalies = [e for e in events if e["event"] in ANOMALY_EVENTS]
    s.checkpoint_problems = [e for e in events if e["event"] in ("checkpoint_corrupt", "checkpoint_unverified", "checkpoint_failed")]
    strag = [e for e in events if e["event"] == "stragglers"]
    s.stragglers = strag[-1] if strag else None
    if survivors:
        s.final_loss = survivors[-1]["loss"]
    if evals:
        s.final_eval_loss = last_per_step(evals)[-1]["eval_loss"]
    return s


def event_step(e: dict):
    """The step an event is about: `step`, else a rollback's `from_step`, else a restart's `resumed_step` (or None)."""
    for key in ("step", "from_step", "resumed_step"):
        if is_number(e.get(key)):
            return int(e[key])
    return None


def _describe(e: dict) -> str:
    if e["event"] == "rollback":
        frm, to = event_step(e), e.get("to_step")
        text = "rollback:" + (f" from step {frm}" if frm is not None else "") + (f" to step {to}" if is_number(to) else "")
        return text + (f" ({_int(e.get('steps_lost'))} steps lost)" if is_number(e.get("steps_lost")) else "")
    step = event_step(e)
    detail = e.get("kind") or e.get("action") or e.get("signal") or ""
    if e["event"] == "transient_fault":
        detail = f"{e.get('reason', 'anomaly')} gone on a re-run"
    return f"{e['event']}:" + (f" step {step}" if step is not None else "") + f" rank {e.get('rank')} {detail}".rstrip()


def format_summary(s: RunSummary) -> str:
    lines = [f"run: {s.run_dir}"]
    if s.all_skipped:
        n = f"all {s.steps} steps were skipped" if s.skipped_steps >= s.steps else f"every logged step was skipped ({s.skipped_steps} known of {s.steps})"
        lines.append(f"no optimizer update was applied: {n} (NaN/Inf or loss spikes; see the nan/spike events and resilience.on_nan / on_spike)")
    lines += [
        f"steps: {s.steps}   tokens: {s.tokens:,}" + (f" ({s.tokens_per_step:,}/step)" if s.tokens_per_step else ""),
        f"wall: {format_duration(s.wall_s)}   productive: {format_duration(s.productive_s)}   lost: {format_duration(s.lost_s)}   ETTR: {s.ettr:.1%}",
        f"attempts: {s.attempts}   failures: {len(s.failures)}   steps lost: {s.steps_lost}"
        + (f" ({s.rerun_records} re-run log lines superseded)" if s.rerun_records else "")
        + (f"   skipped updates: {s.skipped_steps}" if s.skipped_steps else ""),
    ]
    if s.unsaved_steps:
        lines.append(f"unfinished: {s.unsaved_steps} step(s) after the newest checkpoint (step {s.last_checkpoint or 0}) "
                     "are not saved (the save failed, see below); they count as lost")
    if s.final_loss is not None:
        lines.append(f"final loss: {s.final_loss:.4f}" + (f"   final eval loss: {s.final_eval_loss:.4f}" if s.final_eval_loss is not None else ""))
    for e in s.failures:
        down = e.get("downtime_s")
        lines.append(f"  failure: {e.get('what')} (rank {e.get('failed_rank')}) after step {e.get('last_step')}; "
                     f"resumed at {e.get('resumed_step')}, {_int(e.get('steps_lost'))} steps and {float(down) if is_number(down) else 0.0:.1f} s lost")
    for e in s.anomalies:
        lines.append("  " + _describe(e))
    for e in s.checkpoint_problems:
        problems = e.get("problems") if isinstance(e.get("problems"), list) else []
        lines.append(f"  {e['event']}: {e.get('path', '')} {'; '.join(map(str, problems[:2])) or e.get('reason', '')}".rstrip())
    if s.stragglers:
        slow = ", ".join(f"rank {r} {t:.3f}s ({x:.2f}x)" for r, t, x in s.stragglers.get("slowest", []))
        lines.append(f"slowest ranks (step {s.stragglers.get('step')}): {slow}")
    for p in s.plots + ([s.html] if s.html else []):
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def summary_json(s: RunSummary) -> str:
    return json.dumps(asdict(s), indent=1, default=str)
