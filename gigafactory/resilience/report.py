"""Summarise a run directory: steps, tokens, failures, time lost, ETTR, and loss/throughput plots (PNG + HTML).

Inputs: RUN_DIR/metrics.jsonl (train lines {"step","time","loss","grad_norm","lr","aux_loss","tokens_per_s","mfu"}
and eval lines {"step","time","eval_loss"}; an optional "step_time" key is used when present) and
RUN_DIR/events.jsonl (see gigafactory.resilience.events).

ETTR (effective training time ratio) = productive step time / wall time. Productive time counts each step that
survives in the final model once: steps re-run after a restart or rollback count only for their last run. Step time
is "step_time" if logged, else tokens_per_step / tokens_per_s (tokens_per_step from the `start` event, else from the
config.toml with data parallel 1). Wall time runs from the first record to the last. Time lost = wall - productive.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.resilience.events import read_events

FAILURE_EVENTS = ("restart",)


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
    final_loss: float | None = None
    final_eval_loss: float | None = None
    stragglers: dict | None = None
    plots: list[str] = field(default_factory=list)
    html: str = ""


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            train.append(rec)
        elif "eval_loss" in rec:
            evals.append(rec)
    return train, evals


def _tokens_per_step(run_dir: Path, events: list[dict]) -> int:
    for e in reversed(events):
        if e["event"] == "start" and e.get("tokens_per_step"):
            return int(e["tokens_per_step"])
    try:
        import tomllib

        cfg = tomllib.loads((run_dir / "config.toml").read_text())
        t, d = cfg.get("training", {}), cfg.get("data", {})
        return int(t.get("batch_size", 0)) * int(t.get("grad_accum_steps", 1)) * int(d.get("seq_len", 0))
    except (OSError, ValueError):
        return 0


def summarise(run_dir: Path | str, events_file: str = "events.jsonl") -> RunSummary:
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' does not exist; pass the logging.run_dir of a `gigafactory train` run")
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    events = read_events(run_dir / events_file)
    if not train and not events:
        raise UserError(f"'{run_dir}' has no metrics.jsonl or {events_file} records; is it the logging.run_dir of a training run?")
    s = RunSummary(run_dir=str(run_dir))
    s.tokens_per_step = _tokens_per_step(run_dir, events)
    last: dict[int, dict] = {}
    for rec in sorted(train, key=lambda r: r["time"]):
        last[int(rec["step"])] = rec  # a step re-run after a restart or rollback counts once, its last run
    survivors = [last[k] for k in sorted(last)]
    prev_step = 0
    for rec in survivors:
        dt = rec.get("step_time")
        if dt is None and rec.get("tokens_per_s") and s.tokens_per_step:
            dt = s.tokens_per_step / rec["tokens_per_s"]
        s.productive_s += float(dt or 0.0) * (int(rec["step"]) - prev_step)  # unlogged steps between log lines
        prev_step = int(rec["step"])
    s.steps = prev_step
    s.tokens = s.steps * s.tokens_per_step
    times = [r["time"] for r in train + evals] + [e["time"] for e in events]
    starts = [e["time"] for e in events if e["event"] == "start"]
    if starts:
        begin = min(starts)
    else:  # no events: the first metrics line is written at the end of its step(s)
        first = min(train, key=lambda r: r["time"]) if train else None
        dt = (first.get("step_time") or (s.tokens_per_step / first["tokens_per_s"] if first.get("tokens_per_s") and s.tokens_per_step else 0.0)) if first else 0.0
        begin = min(times) - float(dt) * (int(first["step"]) if first else 0)
    s.wall_s = max(max(times) - begin, s.productive_s) if times else 0.0
    s.lost_s = max(0.0, s.wall_s - s.productive_s)
    s.ettr = s.productive_s / s.wall_s if s.wall_s > 0 else 0.0
    s.attempts = 1 + len({e.get("attempt") for e in events} - {0, None})
    s.failures = [e for e in events if e["event"] in FAILURE_EVENTS]
    s.steps_lost = sum(int(e.get("steps_lost", 0)) for e in events if e["event"] in ("restart", "rollback"))
    s.anomalies = [e for e in events if e["event"] in ("nan", "spike", "hang", "rollback", "checkpoint_failed", "fault_injected")]
    s.checkpoint_problems = [e for e in events if e["event"] in ("checkpoint_corrupt", "checkpoint_unverified", "checkpoint_failed")]
    strag = [e for e in events if e["event"] == "stragglers"]
    s.stragglers = strag[-1] if strag else None
    if survivors:
        s.final_loss = survivors[-1]["loss"]
    if evals:
        s.final_eval_loss = max(evals, key=lambda r: (r["step"], r["time"]))["eval_loss"]
    return s


def format_summary(s: RunSummary) -> str:
    lines = [
        f"run: {s.run_dir}",
        f"steps: {s.steps}   tokens: {s.tokens:,}" + (f" ({s.tokens_per_step:,}/step)" if s.tokens_per_step else ""),
        f"wall: {_dur(s.wall_s)}   productive: {_dur(s.productive_s)}   lost: {_dur(s.lost_s)}   ETTR: {s.ettr:.1%}",
        f"attempts: {s.attempts}   failures: {len(s.failures)}   steps lost: {s.steps_lost}",
    ]
    if s.final_loss is not None:
        lines.append(f"final loss: {s.final_loss:.4f}" + (f"   final eval loss: {s.final_eval_loss:.4f}" if s.final_eval_loss is not None else ""))
    for e in s.failures:
        lines.append(f"  failure: {e.get('what')} (rank {e.get('failed_rank')}) after step {e.get('last_step')}; "
                     f"resumed at {e.get('resumed_step')}, {e.get('steps_lost', 0)} steps and {e.get('downtime_s', 0):.1f} s lost")
    for e in s.anomalies:
        detail = e.get("kind") or e.get("action") or ""
        lines.append(f"  {e['event']}: step {e.get('step', '?')} rank {e.get('rank')} {detail}".rstrip())
    for e in s.checkpoint_problems:
        lines.append(f"  {e['event']}: {e.get('path', '')} {'; '.join(e.get('problems', [])[:2]) or e.get('reason', '')}".rstrip())
    if s.stragglers:
        slow = ", ".join(f"rank {r} {t:.3f}s ({x:.2f}x)" for r, t, x in s.stragglers.get("slowest", []))
        lines.append(f"slowest ranks (step {s.stragglers.get('step')}): {slow}")
    for p in s.plots + ([s.html] if s.html else []):
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def write_plots(s: RunSummary, out_dir: Path, events_file: str = "events.jsonl") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(s.run_dir)
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    events = read_events(run_dir / events_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = min([r["time"] for r in train + evals] + [e["time"] for e in events if e["event"] == "start"], default=0.0)
    marks = [e for e in events if e["event"] in ("restart", "rollback", "hang", "nan", "spike")]
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], ".-", ms=3, lw=0.8, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=4, label="eval loss")
    for e in marks:
        step = e.get("resumed_step", e.get("to_step", e.get("step")))
        if step is not None:
            ax.axvline(step, color="red" if e["event"] in ("restart", "hang") else "orange", lw=0.8, ls="--")
    ax.set_xlabel("step (dashed: restarts / rollbacks / anomalies)")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(f"loss — {run_dir.name}")
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = [r for r in train if r.get("tokens_per_s")]
    ax.plot([(r["time"] - t0) / 60 for r in rows], [r["tokens_per_s"] for r in rows], ".", ms=3)
    for e in marks:
        ax.axvline((e["time"] - t0) / 60, color="red" if e["event"] in ("restart", "hang") else "orange", lw=0.8, ls="--")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"throughput — ETTR {s.ettr:.1%}, {len(s.failures)} failure(s)")
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_html(s: RunSummary, out_dir: Path, plots: list[Path], events_file: str = "events.jsonl") -> Path:
    events = read_events(Path(s.run_dir) / events_file)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (round(e["time"] - (events[0]["time"] if events else 0), 2), e["event"], e.get("rank"), e.get("attempt"), e.get("step", e.get("resumed_step", "")),
                                                                   json.dumps({k: v for k, v in e.items() if k not in ("time", "event", "rank", "attempt", "step")})[:300])) + "</tr>"
        for e in events
    )
    summary = html.escape(format_summary(s))
    imgs = "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in plots)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gigafactory report — {html.escape(Path(s.run_dir).name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}pre{{background:#f5f5f5;padding:1em}}img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head><body>
<h1>Run report: {html.escape(s.run_dir)}</h1>
<p><b>ETTR {s.ettr:.1%}</b> — {s.steps} steps, {s.tokens:,} tokens, {len(s.failures)} failure(s), {_dur(s.lost_s)} lost of {_dur(s.wall_s)}.</p>
<pre>{summary}</pre>{imgs}
<h2>Events</h2><table><tr><th>t (s)</th><th>event</th><th>rank</th><th>attempt</th><th>step</th><th>details</th></tr>{rows}</table>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def build_report(run_dir: Path | str, out_dir: Path | str | None = None, plots: bool = True, events_file: str = "events.jsonl") -> RunSummary:
    s = summarise(run_dir, events_file)
    if plots:
        out = Path(out_dir) if out_dir else Path(s.run_dir) / "report"
        pngs = write_plots(s, out, events_file)
        s.plots = [str(p) for p in pngs]
        s.html = str(write_html(s, out, pngs, events_file))
    return s


def summary_json(s: RunSummary) -> str:
    return json.dumps(asdict(s), indent=1, default=str)
