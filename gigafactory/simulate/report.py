"""Terminal tables (rich) for one simulated configuration and for a sweep."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from gigafactory.simulate.config import DAY_S
from gigafactory.simulate.failures import FailureClass


def _hours(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def print_report(d: dict, console: Console | None = None) -> None:
    console = console or Console()
    inp, exp = d["inputs"], d["expected"]
    days = inp["days"]
    mode = inp["recovery"] + (f", {inp['replica_groups']} groups of {inp['replica_group_gpus']:,} GPUs" if inp["recovery"] == "replica" else "")
    head = Table(title=f"simulate: {inp['gpus']:,} GPUs ({inp['nodes']:,} nodes, {inp['spare_nodes']} spares), {days:g} days, "
                       f"{len(inp['seeds'])} seed(s), recovery {mode}")
    head.add_column("metric")
    head.add_column("simulated", justify="right")
    head.add_column("analytic", justify="right")
    spread = f" ± {d['ettr_std']:.4f}" if len(inp["seeds"]) > 1 else ""
    head.add_row("ETTR", f"{d['ettr']:.4f}{spread}", f"{exp['ettr']:.4f}")
    head.add_row("MTBI (failures of job-killing classes)", _hours(d["mtbi_s"]), _hours(exp.get("failures_mtbi_s")))
    fleet = exp.get("failures_mtbi_s")
    head.add_row("failures / day", f"{d['failures'] / days:.2f}", f"{DAY_S / fleet:.2f}" if fleet else "-")
    head.add_row("interruptions / day (struck running work)", f"{d['interruptions'] / days:.2f}", "")
    head.add_row("job restarts / day", f"{d['job_restarts'] / days:.2f}", f"{DAY_S / exp['mtbi_s']:.2f}" if exp.get("mtbi_s") else "0")
    if inp["recovery"] == "replica":
        head.add_row("absorbed by replica groups / day", f"{(d['interruptions'] - d['job_restarts']) / days:.2f}", f"{exp['absorbed_per_day']:.2f}")
        head.add_row("rejoin: group state, peer transfer", f"{inp['group_state_bytes'] / 1e12:.2f} TB, {inp['peer_transfer_s']:.1f} s", "")
    head.add_row(
        "checkpoint interval", f"{_hours(inp['checkpoint_interval_s'])} ({inp['checkpoint_interval_steps']:.0f} steps, {inp['checkpoint_policy']})",
        f"Young {_hours(exp.get('young_s'))}, Daly {_hours(exp.get('daly_s'))}",
    )
    head.add_row("goodput", f"{d['goodput_tokens_per_s']:,.0f} tok/s", "")
    head.add_row("tokens kept", f"{d['tokens_kept']:.3e}", "")
    head.add_row("lost work", f"{d['lost_gpu_hours']:,.0f} GPU-h", "")
    console.print(head)
    console.print(f"[dim]analytic column assumes {exp.get('assumes', '')}[/dim]")

    causes = Table(title="interruptions by cause (mean per run; failures while already down are not counted)")
    for col in ("cause", "count", "share", "per day"):
        causes.add_column(col, justify="left" if col == "cause" else "right")
    total = d["interruptions"] or 1
    for name, n in sorted(d["interruptions_by_cause"].items(), key=lambda kv: -kv[1]):
        causes.add_row(name, f"{n:.1f}", f"{100 * n / total:.1f}%", f"{n / days:.2f}")
    for name, n in d["non_fatal_by_cause"].items():
        causes.add_row(f"{name} (non-fatal)", f"{n:.1f}", "-", f"{n / days:.2f}")
    console.print(causes)

    states = Table(title="time per state (mean per run)")
    for col in ("state", "hours", "share"):
        states.add_column(col, justify="left" if col == "state" else "right")
    for name, s in d["time_s"].items():
        states.add_row(name, f"{s / 3600:,.1f}", f"{100 * d['time_fraction'][name]:.2f}%")
    console.print(states)


def print_sweep(key: str, rows: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"sweep over {key}")
    for col in (key, "ETTR", "analytic", "interval", "spares", "interruptions", "MTBI", "goodput tok/s", "lost GPU-h"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " *" if r["best"] else ""
        table.add_row(
            f"{r[key]:g}{mark}", f"{r['ettr']:.4f} ± {r['ettr_std']:.4f}", f"{r['expected_ettr']:.4f}", _hours(r["interval_s"]),
            str(r["spare_nodes"]), f"{r['interruptions']:.1f}", _hours(r["mtbi_s"]), f"{r['goodput_tokens_per_s']:,.0f}",
            f"{r['lost_gpu_hours']:,.0f}",
        )
    console.print(table)
    console.print("[dim]* = highest simulated ETTR[/dim]")


def print_classes(classes: list[FailureClass], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="failure classes")
    for col in ("class", "rate / device-day", "per", "detect", "repair", "nodes", "kills job", "shows as", "source"):
        table.add_column(col)
    for c in classes:
        notes = ["hang" if c.hangs else "crash"] + (["spreads"] if c.spreads else []) + ([f"outage {_hours(c.outage_s)}"] if c.outage_s else [])
        table.add_row(c.name, f"{c.rate:.3e}", c.per, _hours(c.detect_s), _hours(c.repair_s), str(c.nodes_affected), str(c.kills_job),
                      ", ".join(notes), c.source)
    console.print(table)


def print_power(p: dict, console: Console | None = None) -> None:
    """The facility power section of `simulate --power`: levels, largest swings by cause, smoothing's cost."""
    console = console or Console()
    inp = p["inputs"]
    table = Table(title=f"facility power: {inp['gpus']:,} GPUs, busy {p['busy_mw']:.1f} MW, idle {p['idle_mw']:.1f} MW "
                        f"(GPU {inp['gpu_busy_w']:g}/{inp['gpu_idle_w']:g} W, host {inp['host_w_per_gpu']:g} W/GPU, PUE {inp['pue']:g})")
    variants = [v for v in ("plain", "smoothed") if v in p]
    table.add_column("change of state")
    for v in variants:
        label = "no smoothing" if v == "plain" else f"floor {inp['power_floor']:g}, ramp {inp['ramp_s']:g} s"
        table.add_column(f"{label}: MW", justify="right")
        table.add_column("MW/s", justify="right")
    causes = list(dict.fromkeys(c for v in variants for c in p[v]["by_cause"]))
    for cause in causes:
        row = [cause]
        for v in variants:
            c = p[v]["by_cause"].get(cause, {"mw": 0.0, "mw_per_s": 0.0})
            row += [f"{c['mw']:.1f}", f"{c['mw_per_s']:.1f}"]
        table.add_row(*row)
    row = ["largest (worst seed)"]
    for v in variants:
        row += [f"{p[v]['swing_mw']:.1f}", f"{p[v]['mw_per_s']:.1f}"]
    table.add_row(*row)
    row = ["energy (mean per run)"]
    for v in variants:
        row += [f"{p[v]['energy_mwh']:,.0f} MWh", ""]
    table.add_row(*row)
    console.print(table)
    if "smoothing_cost" in p:
        c = p["smoothing_cost"]
        console.print(f"smoothing costs {c['extra_energy_mwh']:,.0f} MWh ({100 * c['extra_energy_fraction']:.1f}% more energy) and "
                      f"{c['ramp_cost_s'] / 3600:.2f} h of training time in start-up ramps ({c['restarts']:.0f} restarts); "
                      "a crash still drops to idle at once (no process left to hold the floor)")
    console.print(f"[dim]a change of state takes {inp['transition_s']:g} s (MW/s = MW / that); inputs and sources: docs/operations.md[/dim]")

