"""Plan results as JSON rows, a rich table, the chosen layout's TOML, and a sweep plot."""

from __future__ import annotations

from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.plan.cost import StepEstimate
from gigafactory.plan.forecast import Forecast
from gigafactory.plan.hardware import Cluster

GIB = 2**30


def row(est: StepEstimate, fc: Forecast, cluster: Cluster, priced: int = 0, failures: dict | None = None, w=None) -> dict:
    """One JSON object per cluster size (the simulator reads gpus, step_time_s, tokens_per_step, checkpoint_time_s,
    replica_group_gpus, params). `failures` (plan/reliability.py) replaces days, GPU-hours, energy and cost with
    their values once failures are paid for, and adds ETTR and the failure-free figures."""
    lay = est.layout
    out = {
        "gpus": fc.gpus, "gpus_used": fc.gpus_used, "gpu": cluster.gpu.name, "network": cluster.network.name,
        "layout": {
            "dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep,
            "cp": lay.cp, "schedule": lay.schedule, "virtual_stages": lay.virtual_stages,
            "microbatch_size": lay.microbatch_size, "microbatches": lay.microbatches,
            "checkpointing": lay.checkpointing, "sequence_parallel": lay.sequence_parallel, "zero": lay.zero,
            "reduce_dtype": lay.reduce_dtype, "precision": lay.precision, "stage_layers": list(est.stage_layers),
        },
        "mfu_causal": est.mfu_causal, "mfu_convention": "mfu: full attention FLOPs (PaLM/Megatron); mfu_causal: causal-halved (Llama 3); both over the bf16 peak",
        "step_time_s": est.step_time_s, "tokens_per_step": est.tokens_per_step, "tokens_per_s": est.tokens_per_s,
        "mfu": est.mfu, "hfu": est.hfu, "tflops_per_gpu": est.tflops_per_gpu,
        "peak_memory_gib": est.memory.total / GIB, "memory_gib": {
            "states": est.memory.states / GIB, "activations": est.memory.activations / GIB,
            "buffers": est.memory.buffers / GIB, "reserved": est.memory.reserved / GIB},
        "hbm_gib": cluster.gpu.hbm_gb * 1e9 / GIB, "fits": est.fits,
        "days": fc.days, "gpu_hours": fc.gpu_hours, "energy_mwh": fc.energy_mwh, "facility_mw": fc.facility_mw,
        "pue": cluster.pue, "cost_usd": fc.cost_usd, "usd_per_gpu_hour": cluster.usd_per_gpu_hour,
        "interruptions_per_day": fc.interruptions_per_day, "checkpoint_time_s": fc.checkpoint_time_s,
        "step_breakdown_s": est.breakdown, "layouts_priced": priced, "parallel_toml": lay.toml(),
    }
    return {**out, **(failures or {})}


def _layout_str(lay: dict) -> str:
    parts = [f"{k}={lay[k]}" for k in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp") if lay[k] > 1 or k == "dp_shard"]
    sched = lay["schedule"] + (f"(v={lay['virtual_stages']})" if lay["schedule"] == "interleaved_1f1b" else "")
    data = f"zero={lay['zero']}" if lay["dp_shard"] > 1 else "ddp"
    stages = lay.get("stage_layers") or []
    uneven = f"\nstages {'+'.join(map(str, stages))}" if len(set(stages)) > 1 else ""
    return (" ".join(parts) + f"\nmbs={lay['microbatch_size']} x{lay['microbatches']} {sched if lay['pp'] > 1 else ''} ac={lay['checkpointing']}"
            + f"\n{data} {lay.get('precision', 'bf16')}" + uneven)


def _breakdown(r: dict) -> str:
    terms = sorted(((v, k) for k, v in r["step_breakdown_s"].items() if v > 0.0005 * r["step_time_s"]), reverse=True)
    return "\n".join(f"{k} {v:.3f}" for v, k in terms)


def _power(r: dict) -> str:
    p = r.get("power")
    if not p:
        return "-"
    names = {"compute": "compute", "communication": "exposed comm", "idle": "bubble", "optimizer": "optimizer"}
    phases = [f"{names[ph['phase']]} {ph['seconds']:.3f} s @ {ph['it_mw']:.1f}" for ph in p["step_phases"] if ph["seconds"] >= 0.0005]
    return "\n".join(phases + [
        f"step average {p['step_avg_it_mw']:.1f}",
        f"checkpoint {p['checkpoint_pause']['seconds']:.0f} s / restart {p['restart_pause']['seconds']:.0f} s @ {p['checkpoint_pause']['it_mw']:.1f}",
        f"largest swing {p['swing_mw']:.1f} MW at {p['swing_mw_per_s']:.0f} MW/s",
        f"swing inside a step {p['swing_within_step_mw']:.1f} MW"])


def render_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("metric", style="bold")
    for r in rows:
        table.add_column(r.get("label") or f"{r['gpus']:,} x {r['gpu']}", justify="right")
    metrics = [
        ("GPUs used (rest spare)", lambda r: f"{r['gpus_used']:,}"),
        ("layout", lambda r: _layout_str(r["layout"])),
        ("step time", lambda r: f"{r['step_time_s']:.3f} s"),
        ("tokens / step", lambda r: f"{r['tokens_per_step'] / 1e6:.2f} M"),
        ("tokens / s", lambda r: f"{r['tokens_per_s'] / 1e6:.2f} M"),
        ("step breakdown (s, slowest stage)", _breakdown),
        ("MFU full attn / causal / HFU", lambda r: f"{r['mfu'] * 100:.1f}% / {r['mfu_causal'] * 100:.1f}% / {r['hfu'] * 100:.1f}%"),
        ("TFLOP/s per GPU", lambda r: f"{r['tflops_per_gpu']:.0f}"),
        ("peak memory / GPU", lambda r: f"{r['peak_memory_gib']:.1f} / {r['hbm_gib']:.0f} GiB"),
        ("recovery", lambda r: r.get("recovery", "-") + (f" ({r['replica_groups']} groups)" if r.get("recovery") == "replica" else "")),
        ("ETTR (failures + checkpoints)", lambda r: f"{r['ettr']:.3f}" if "ettr" in r else "-"),
        ("days to train", lambda r: f"{r['days']:.1f}" + (f" ({r['days_failure_free']:.1f} failure-free)" if "ettr" in r else "")),
        ("GPU-hours", lambda r: f"{r['gpu_hours'] / 1e6:.2f} M"),
        ("energy", lambda r: f"{r['energy_mwh']:,.0f} MWh"),
        ("facility power: peak / step average", lambda r: f"{r['facility_mw']:.1f} / {r.get('facility_mw_avg', r['facility_mw']):.1f} MW (PUE {r['pue']})"),
        ("IT power (MW) by phase", _power),
        ("cost", lambda r: f"${r['cost_usd'] / 1e6:,.1f} M" + (f" (ETTR {r['ettr']:.3f})" if "ettr" in r else "")),
        ("failures / day (of kinds that restart the job)", lambda r: f"{r['interruptions_per_day']:.1f} ({r.get('restarting_failures_per_day', r['interruptions_per_day']):.1f})"),
        ("checkpoint write", lambda r: f"{r['checkpoint_time_s']:.1f} s"),
    ]
    for name, fmt in metrics:
        table.add_row(name, *[fmt(r) for r in rows])
    Console().print(table)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Days, MFU and cost against GPU count (log x); Agg backend, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [r["gpus"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label, scale in ((axes[0], "days", "days to train", 1), (axes[1], "mfu", "MFU (%)", 100),
                                  (axes[2], "cost_usd", "cost ($M)", 1e-6)):
        ax.plot(gpus, [r[key] * scale for r in rows], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise UserError(f"--plot {path}: cannot write it ({err.strerror or err}); choose a writable file path") from err
    finally:
        plt.close(fig)
