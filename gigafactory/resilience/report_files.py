"""`gigafactory report`'s files: loss and throughput plots (PNG) with restart/rollback/anomaly marks, and one HTML
page with the summary and every event. The numbers come from report.py's summary."""

from __future__ import annotations

import html
import json
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.resilience.report import (RunSummary, event_step, format_duration, format_summary, is_number,
                                           last_per_step, load, read_run_events, summarise)

# Dashed vertical markers on the plots: event -> (colour, legend label).
MARKS = {"restart": ("red", "restart"), "hang": ("darkred", "hang"), "rollback": ("orange", "rollback"),
         "nan": ("purple", "nan / inf"), "spike": ("goldenrod", "loss spike")}


def _mark(ax, events: list[dict], x_of) -> None:
    """Dashed vertical lines for restarts, rollbacks and anomalies, one legend entry per kind."""
    seen = set()
    for e in events:
        x = x_of(e)
        if e["event"] not in MARKS or x is None:
            continue
        colour, label = MARKS[e["event"]]
        ax.axvline(x, color=colour, lw=0.8, ls="--", label="_nolegend_" if e["event"] in seen else label)
        seen.add(e["event"])


def write_plots(s: RunSummary, out_dir: Path, events_file: str = "events.jsonl") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, train, evals, events = load(s.run_dir, events_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = min([r["time"] for r in train + evals] + [e["time"] for e in events if e["event"] == "start"], default=0.0)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    survivors, eval_survivors = last_per_step(train), last_per_step(evals)  # the attempt that counts: no zig-zag
    if survivors:
        ax.plot([r["step"] for r in survivors], [r["loss"] for r in survivors], ".-", ms=3, lw=0.8, label="train loss")
    if eval_survivors:
        ax.plot([r["step"] for r in eval_survivors], [r["eval_loss"] for r in eval_survivors], "o-", ms=4, label="eval loss")
    _mark(ax, events, lambda e: next((e[k] for k in ("resumed_step", "to_step", "step") if is_number(e.get(k))), None))
    ax.set_xlabel("step (restart / rollback marks: the step resumed from)"
                  + (f"; {s.steps_lost} lost steps were re-run, each drawn from its last run" if s.steps_lost else ""))
    ax.set_ylabel("loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(f"loss — {run_dir.name}" + (" — no optimizer update was applied" if s.all_skipped else ""))
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = [r for r in train if is_number(r.get("tokens_per_s"))]  # every attempt: wall time does not rewind
    ax.plot([(r["time"] - t0) / 60 for r in rows], [r["tokens_per_s"] for r in rows], ".", ms=3, label="tokens/s")
    _mark(ax, events, lambda e: (e["time"] - t0) / 60)
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    ax.set_title(f"throughput — ETTR {s.ettr:.1%}, {len(s.failures)} failure(s)")
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_html(s: RunSummary, out_dir: Path, plots: list[Path], events_file: str = "events.jsonl") -> Path:
    events = read_run_events(Path(s.run_dir) / events_file)
    t0 = events[0]["time"] if events else 0
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            round(e["time"] - t0, 2), e["event"], e.get("rank"), e.get("attempt"), "" if event_step(e) is None else event_step(e),
            json.dumps({k: v for k, v in e.items() if k not in ("time", "event", "rank", "attempt", "step")})[:300])) + "</tr>"
        for e in events
    )
    summary = html.escape(format_summary(s))
    imgs = "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in plots)
    warn = "<p><b>No optimizer update was applied: every step was skipped.</b></p>" if s.all_skipped else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gigafactory report — {html.escape(Path(s.run_dir).name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}pre{{background:#f5f5f5;padding:1em}}img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head><body>
<h1>Run report: {html.escape(s.run_dir)}</h1>{warn}
<p><b>ETTR {s.ettr:.1%}</b> — {s.steps} steps, {s.tokens:,} tokens, {len(s.failures)} failure(s), {format_duration(s.lost_s)} lost of {format_duration(s.wall_s)}.</p>
<pre>{summary}</pre>{imgs}
<h2>Events</h2><table><tr><th>t (s)</th><th>event</th><th>rank</th><th>attempt</th><th>step</th><th>details</th></tr>{rows}</table>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def build_report(run_dir: Path | str, out_dir: Path | str | None = None, plots: bool = True, events_file: str = "events.jsonl") -> RunSummary:
    s = summarise(run_dir, events_file)
    if plots:
        out = Path(out_dir).expanduser() if out_dir else Path(s.run_dir) / "report"
        if out.exists() and not out.is_dir():
            raise UserError(f"{'--out' if out_dir else 'the report directory'} '{out}' is a file; give a directory "
                            "(created if missing) for loss.png, throughput.png and report.html")
        try:
            pngs = write_plots(s, out, events_file)
            s.plots = [str(p) for p in pngs]
            s.html = str(write_html(s, out, pngs, events_file))
        except OSError as err:
            raise UserError(f"cannot write the report to '{out}': {err.strerror or err}; choose another directory with --out") from None
    return s
