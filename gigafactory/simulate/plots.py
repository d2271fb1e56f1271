"""PNG figures (matplotlib, Agg backend): the timeline of one run and the curve of a sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gigafactory.simulate import analytic  # noqa: E402
from gigafactory.simulate.config import DAY_S  # noqa: E402
from gigafactory.simulate.engine import RunResult  # noqa: E402

COLORS = {
    "run": "#2ca02c", "reconfigure": "#bcbd22", "detect": "#ff7f0e", "outage": "#8c564b", "wait_for_nodes": "#d62728",
    "restart": "#1f77b4", "maintenance": "#9467bd",
}


def timeline_png(run: RunResult, path: str | Path, title: str = "", zoom_s: float = DAY_S) -> Path:
    """Job state over the whole run and over its first `zoom_s` (failures marked), and training work kept vs wall time."""
    if not run.timeline:
        raise ValueError("run has no timeline; simulate with sim.timeline=True")
    fig, (ax_all, ax_zoom, ax_work) = plt.subplots(3, 1, figsize=(12, 7), height_ratios=(1, 1, 2.5))
    merged = _merge(run.timeline)
    zoom = min(zoom_s, run.horizon_s)
    for ax, unit, end in ((ax_all, DAY_S, run.horizon_s), (ax_zoom, 3600.0, zoom)):
        for phase in COLORS:
            bars = [(t0 / unit, (min(t1, end) - t0) / unit) for t0, t1, p in merged if p == phase and t0 < end]
            ax.broken_barh(bars, (0, 1), color=COLORS[phase], label=phase, linewidth=0)
        ax.set_yticks([])
        ax.set_xlim(0, end / unit)
    fails = [t / 3600.0 for t, _ in run.failures if t < zoom]
    ax_zoom.vlines(fails, 1.0, 1.25, color="black", lw=0.8)
    ax_zoom.set_ylim(0, 1.3)
    ax_all.set_xlabel("wall time (days)")
    ax_zoom.set_xlabel(f"first {zoom / 3600:g} h (ticks: failures)")
    handles, labels = ax_all.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(COLORS), fontsize=8, frameon=False)
    fig.suptitle(title or f"seed {run.seed}: {run.n_interruptions} interruptions, ETTR {run.ettr:.3f}", x=0.01, ha="left")
    times, work = zip(*run.work_trace) if run.work_trace else ((), ())
    ax_work.plot([t / DAY_S for t in times], [w / 3600.0 for w in work], color="#2ca02c", lw=0.8, label="training work kept")
    ax_work.plot([0, run.horizon_s / DAY_S], [0, run.horizon_s / 3600.0], color="grey", ls="--", lw=0.8, label="no failures, no checkpoints")
    ax_work.set_xlabel("wall time (days)")
    ax_work.set_ylabel("training work (hours)")
    ax_work.legend(loc="upper left", fontsize=8)
    ax_work.set_xlim(0, run.horizon_s / DAY_S)
    return _save(fig, path)


def power_png(curves: dict[str, list[tuple[float, float]]], run: RunResult, path: str | Path, report: dict, window_s: float = 3 * 3600.0) -> Path:
    """Facility MW over the whole run and over `window_s` around the first failure (checkpoint dips, the crash, the
    restart and its ramp), one line per smoothing variant; failures ticked."""
    fig, (ax_all, ax_zoom) = plt.subplots(2, 1, figsize=(12, 6.5))
    first = run.failures[0][0] if run.failures else 0.0
    lo = max(0.0, first - window_s / 3)
    hi = min(run.horizon_s, lo + window_s)
    for i, (label, points) in enumerate(curves.items()):
        ts, mw = zip(*points)
        style = {"lw": 0.6, "color": ("#d62728", "#1f77b4")[i % 2], "alpha": 0.9 if i else 0.7}
        edges, low, high, mean = _envelope(ts, mw, run.horizon_s)
        days = edges / DAY_S
        ax_all.fill_between(days, low, high, step="post", color=style["color"], alpha=0.15, linewidth=0)
        ax_all.step(days, mean, where="post", label=f"{label} (mean; band: min-max)", lw=0.8, color=style["color"])
        inside = [k for k, t in enumerate(ts) if lo <= t <= hi]
        if inside:
            k0, k1 = max(0, inside[0] - 1), min(len(ts), inside[-1] + 2)
            ax_zoom.plot([(t - lo) / 3600.0 for t in ts[k0:k1]], mw[k0:k1], label=label, **style)
    ax_zoom.vlines([(t - lo) / 3600.0 for t, _ in run.failures if lo <= t <= hi], 0, 1, transform=ax_zoom.get_xaxis_transform(),
                   color="black", lw=0.5, alpha=0.5)
    for ax, unit, origin, end in ((ax_all, DAY_S, 0.0, run.horizon_s), (ax_zoom, 3600.0, lo, hi)):
        ax.set_xlim(0, (end - origin) / unit)
        ax.set_ylabel("facility MW")
        ax.grid(alpha=0.3)
    ax_all.set_xlabel("wall time (days)")
    ax_zoom.set_xlabel(f"hours from {lo / 3600:.1f} h (around the first failure; ticks: failures)")
    ax_all.legend(loc="lower right", fontsize=8)
    plain = report["plain"]
    fig.suptitle(f"{report['inputs']['gpus']:,} GPUs: busy {report['busy_mw']:.0f} MW, idle {report['idle_mw']:.0f} MW; largest swing "
                 f"{plain['swing_mw']:.0f} MW, {plain['mw_per_s']:.0f} MW/s without smoothing", x=0.01, ha="left")
    return _save(fig, path)


def _envelope(ts, mw, horizon_s: float, bins: int = 400):
    """Per time bin: min and max of the curve's breakpoints and its time-weighted mean (a 30-day curve has
    thousands of checkpoint dips, too thin to draw one by one)."""
    import numpy as np

    t, y = np.asarray(ts), np.asarray(mw)
    edges = np.linspace(0.0, horizon_s, bins + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    low, high = np.full(bins, np.inf), np.full(bins, -np.inf)
    np.minimum.at(low, idx, y)
    np.maximum.at(high, idx, y)
    fine = np.linspace(0.0, horizon_s, bins * 50)
    mean = np.interp(fine, t, y).reshape(bins, 50).mean(axis=1)
    low, high = np.where(np.isfinite(low), low, mean), np.where(np.isfinite(high), high, mean)
    return edges, *(np.append(a, a[-1]) for a in (low, high, mean))


def sweep_png(key: str, rows: list[dict], path: str | Path, expected_curve: dict | None = None) -> Path:
    """ETTR (mean +- std over seeds) against the swept knob; the analytic curve when sweeping the interval."""
    xs = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar(xs, [r["ettr"] for r in rows], yerr=[r["ettr_std"] for r in rows], marker="o", capsize=3, label="simulated")
    if expected_curve:
        ax.plot(expected_curve["x"], expected_curve["ettr"], color="grey", ls="--", label="analytic (exponential)")
        for name, style in (("young_s", ":"), ("daly_s", "-.")):
            if expected_curve.get(name):
                ax.axvline(expected_curve[name], color="black", ls=style, lw=0.8, label=name.removesuffix("_s").capitalize())
    positive = [x for x in xs if x > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("ETTR (kept training time / wall time)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def interval_curve(delta_s: float, restart_s: float, mtbi_s: float, lo: float, hi: float, n: int = 200, detect_s: float = 0.0) -> dict:
    """Analytic ETTR over [lo, hi] plus Young's and Daly's optima, for sweep_png."""
    xs = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return {
        "x": xs, "ettr": [analytic.expected_ettr(x, delta_s, restart_s, mtbi_s, detect_s) for x in xs],
        "young_s": analytic.young_interval(delta_s, mtbi_s), "daly_s": analytic.daly_interval(delta_s, mtbi_s),
    }


def _merge(timeline: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Join adjacent intervals of the same phase (the engine splits them at every event)."""
    out: list[list] = []
    for t0, t1, phase in timeline:
        if out and out[-1][2] == phase and out[-1][1] == t0:
            out[-1][1] = t1
        else:
            out.append([t0, t1, phase])
    return [tuple(x) for x in out]


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
