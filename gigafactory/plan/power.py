"""Facility power of a planned run: the profile of one step, the pauses for checkpoints and restarts, the largest
swing (MW and MW/s) and the run's energy from busy and idle phases instead of peak power all the time.

Per GPU: compute phases draw the board's TDP (dense GEMMs run at the power cap); exposed communication and pipeline
bubbles spin in collective kernels at `wait_fraction` of the way from idle to TDP; the optimizer step is memory
bound (`memory_fraction`); checkpoint and restart pauses leave the GPU at its idle power. The rest of the server
(CPUs, NICs, fans: system_w_per_gpu - tdp_w) is taken as constant. Spare GPUs idle. Swings are IT power, what the
grid sees within a fraction of a second (Llama 3, Dubey et al. 2024, section 3.3.4: "tens of megawatts" when
16k GPUs wait on a checkpoint or a collective together); PUE applies to averages (cooling follows in minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.plan.cost import StepEstimate
from gigafactory.plan.hardware import Cluster


@dataclass(frozen=True)
class PowerModel:
    """How board power follows what the GPU is doing (assumptions, stated in docs/plan.md)."""

    wait_fraction: float = knob(0.3, "Power while waiting on a collective or in a bubble, as a fraction of idle -> TDP.")
    memory_fraction: float = knob(0.6, "Power of memory-bound kernels (optimizer step), as a fraction of idle -> TDP.")
    response_s: float = knob(0.1, "Time for a GPU's draw to follow a change of work (power management), seconds.")


def _gpu_w(cluster: Cluster, fraction: float) -> float:
    g = cluster.gpu
    return g.idle_w + fraction * (g.tdp_w - g.idle_w)


def profile(est: StepEstimate, cluster: Cluster, checkpoint_s: float, restart_s: float, pm: PowerModel = PowerModel()) -> dict:
    """Phases of a step and of the pauses, each with its duration and the cluster's IT power in MW."""
    g, n, used = cluster.gpu, cluster.n_gpus, est.layout.world
    rest_w = max(0.0, g.system_w_per_gpu - g.tdp_w)
    spare_mw = (n - used) * (g.idle_w + rest_w) / 1e6

    def mw(fraction: float) -> float:
        return used * (_gpu_w(cluster, fraction) + rest_w) / 1e6 + spare_mw

    levels = {"compute": 1.0, "communication": pm.wait_fraction, "idle": pm.wait_fraction, "optimizer": pm.memory_fraction}
    step = [{"phase": k, "seconds": est.phases.get(k, 0.0), "it_mw": mw(f)} for k, f in levels.items()]
    total = sum(p["seconds"] for p in step) or 1.0
    step_avg = sum(p["seconds"] * p["it_mw"] for p in step) / total
    pause = mw(0.0)
    peak = max(p["it_mw"] for p in step)
    in_step = [p["it_mw"] for p in step if p["seconds"] > 0]
    swing = peak - pause
    ramp = max(pm.response_s, est.phases.get("optimizer", 0.0))  # the step's end: all GPUs stop within it
    return {
        "step_phases": step, "step_avg_it_mw": step_avg, "peak_it_mw": peak,
        "checkpoint_pause": {"seconds": checkpoint_s, "it_mw": pause}, "restart_pause": {"seconds": restart_s, "it_mw": pause},
        "swing_mw": swing, "swing_mw_per_s": swing / ramp, "swing_within_step_mw": max(in_step) - min(in_step),
        "pue": cluster.pue,
    }


def energy_mwh(prof: dict, failure_free_s: float, ettr: float, checkpoint_fraction: float, restart_s_total: float, pue: float) -> float:
    """Facility energy of the run: productive and re-run steps at the step's average power, checkpoint stalls and
    restart downtime at idle power, all times PUE. `checkpoint_fraction` is the share of wall time spent writing
    checkpoints; `restart_s_total` the seconds of downtime over the whole run."""
    wall = failure_free_s / ettr if ettr > 0 else failure_free_s
    paused = min(wall - failure_free_s, wall * checkpoint_fraction + restart_s_total) if ettr < 1 else wall * checkpoint_fraction
    paused = max(0.0, paused)
    busy = wall - paused
    return (busy * prof["step_avg_it_mw"] + paused * prof["checkpoint_pause"]["it_mw"]) * pue / 3600
