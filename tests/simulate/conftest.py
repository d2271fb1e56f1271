"""Shared builders: a single-class cluster whose MTBI, checkpoint cost and downtime are set exactly."""

from __future__ import annotations

import pytest

from gigafactory.simulate import ClusterSpec, FailureClass, JobSpec, SimConfig, SimSpec


def one_class_setup(mtbi_s: float, delta_s: float, restart_s: float, detect_s: float = 0.0, *, days: float = 30.0,
                    seeds: int = 1, gpus: int = 64, repair_s: float = 0.0, spares: int = 0) -> tuple[SimConfig, list[FailureClass]]:
    """Exponential failures with job MTBI `mtbi_s`; downtime = detect_s + restart_s; sync checkpoints of delta_s."""
    rate_per_gpu_day = 86400.0 / mtbi_s / gpus
    classes = [FailureClass(name="gpu", rate=rate_per_gpu_day, per="gpu", detect_s=detect_s, repair_s=repair_s)]
    cfg = SimConfig(
        cluster=ClusterSpec(gpus=gpus, gpus_per_node=8, spare_nodes=spares),
        job=JobSpec(step_time_s=1.0, checkpoint_s=delta_s, reschedule_s=restart_s, load_s=0.0, warmup_s=0.0),
        sim=SimSpec(days=days, seeds=seeds),
    )
    return cfg, classes


@pytest.fixture
def setup():
    return one_class_setup
