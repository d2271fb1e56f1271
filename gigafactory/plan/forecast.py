"""From one step to the whole run: days, GPU-hours, energy, facility power, cost, interruptions, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.plan.cost import StepEstimate
from gigafactory.plan.hardware import Cluster
from gigafactory.plan.workload import Workload

CHECKPOINT_BYTES_PER_PARAM = 2 + 4 + 8  # bf16 weights + fp32 master weights + Adam moments


@dataclass(frozen=True)
class Forecast:
    """The run a layout implies for a token budget. Days assume no failures (`gigafactory simulate` adds them)."""

    gpus: int
    gpus_used: int
    days: float
    gpu_hours: float  # every GPU of the cluster, spares included
    facility_mw: float  # cluster at full power x PUE
    energy_mwh: float
    cost_usd: float
    interruptions_per_day: float
    checkpoint_time_s: float  # write one full checkpoint (one data-parallel replica's shards) to storage


def forecast(est: StepEstimate, w: Workload, cluster: Cluster, tokens: float) -> Forecast:
    seconds = tokens / est.tokens_per_s
    days = seconds / 86400
    gpu_hours = cluster.n_gpus * seconds / 3600
    facility_mw = cluster.n_gpus * cluster.gpu.system_w_per_gpu * cluster.pue / 1e6
    ckpt_bytes = w.params_total * CHECKPOINT_BYTES_PER_PARAM
    writers = est.layout.world // max(1, est.layout.dp_replicate)  # one replica writes
    per_writer = cluster.gpu.nic_gbps * 1e9  # each writer is limited by its own NIC
    bandwidth = min(cluster.storage_write_gbps * 1e9, writers * per_writer)
    return Forecast(
        gpus=cluster.n_gpus, gpus_used=est.layout.world, days=days, gpu_hours=gpu_hours, facility_mw=facility_mw,
        energy_mwh=facility_mw * seconds / 3600, cost_usd=gpu_hours * cluster.usd_per_gpu_hour,
        interruptions_per_day=cluster.n_gpus * cluster.gpu_failures_per_day, checkpoint_time_s=ckpt_bytes / bandwidth,
    )


def days_at(tflops_per_gpu: float, params: float, tokens: float, gpus: int, recompute: bool = True) -> float:
    """Narayanan et al.'s end-to-end estimate: time = 8TP / (nX) with recompute (6TP / (nX) without)."""
    return (8 if recompute else 6) * tokens * params / (gpus * tflops_per_gpu * 1e12) / 86400
