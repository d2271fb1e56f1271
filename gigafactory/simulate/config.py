"""Typed inputs of one simulated training job: the cluster, the job itself, and how long / how often to simulate.

Times are seconds unless a name says otherwise. `validate()` raises `UserError` with one line naming the bad knob.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError
from gigafactory.simulate.recovery import RecoverySpec

DAY_S = 86400.0
MAX_DAYS = 3650.0  # ten years: longer than any training run, and bounded so that drawing the arrivals cannot exhaust memory


@dataclass
class ClusterSpec:
    """The machine: nodes of G GPUs, hot spares, failure rates and planned maintenance."""

    gpus: int = knob(100_000, "GPUs the job runs on (must be a multiple of gpus_per_node).")
    gpus_per_node: int = knob(8, "GPUs per node; a node is the unit that is swapped out on a hardware failure.")
    spare_nodes: int = knob(
        -1,
        "Hot-spare nodes; a failed node is swapped for a spare instead of the job waiting for its repair. "
        "-1 = auto: nodes expected in repair (Little's law) + 4 standard deviations.",
    )
    failure_rates: str = knob("", "TOML file of failure classes (rates per device-day); empty = the shipped default.")
    distribution: str = knob(
        "exponential",
        "Inter-arrival law of each class's failures: exponential (Poisson) or weibull (renewal, same mean).",
        choices=("exponential", "weibull"),
    )
    weibull_shape: float = knob(0.7, "Weibull shape k when distribution=weibull (k<1: bursty/infant mortality; k=1: exponential).")
    rate_scale: float = knob(1.0, "Multiply every failure rate by this (what-if: 0.5 = twice as reliable hardware).")
    maintenance_every_days: float = knob(0.0, "Planned maintenance period in days; 0 = none.")
    maintenance_s: float = knob(3600.0, "Length of one planned maintenance window (the job checkpoints first, loses no work).")

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def validate(self) -> None:
        _positive_int("gpus", self.gpus)
        _positive_int("gpus_per_node", self.gpus_per_node)
        if self.gpus % self.gpus_per_node:
            raise UserError(
                f"inconsistent node size: gpus={self.gpus} is not a multiple of gpus_per_node={self.gpus_per_node}; "
                "pick a GPU count that fills whole nodes"
            )
        if isinstance(self.spare_nodes, bool) or not isinstance(self.spare_nodes, int) or self.spare_nodes < -1:
            raise UserError(f"spare_nodes={self.spare_nodes!r} must be an integer >= 0 (or -1 for auto)")
        if not self.weibull_shape > 0:
            raise UserError(f"weibull_shape={self.weibull_shape} must be > 0 (1.0 = exponential)")
        _non_negative("rate_scale", self.rate_scale)
        _non_negative("maintenance_every_days", self.maintenance_every_days)
        _non_negative("maintenance_s", self.maintenance_s)


@dataclass
class JobSpec:
    """The training job: step time, checkpoint policy and cost, restart path."""

    step_time_s: float = knob(10.0, "Wall time of one optimizer step (from `gigafactory plan`, or measured).")
    tokens_per_step: float = knob(16_777_216.0, "Tokens per optimizer step (global batch x sequence length), for goodput.")
    checkpoint_s: float = knob(60.0, "Time to write one checkpoint to durable storage.")
    checkpoint_mode: str = knob(
        "sync",
        "sync: training stalls for checkpoint_s; async: it stalls for async_stall_s and the write finishes in the background.",
        choices=("sync", "async"),
    )
    async_stall_s: float = knob(5.0, "Training stall per checkpoint when checkpoint_mode=async (snapshot to host memory).")
    checkpoint_policy: str = knob(
        "daly",
        "How the checkpoint interval is chosen: daly or young (optimum for the cluster's MTBI) or fixed (checkpoint_interval_s).",
        choices=("daly", "young", "fixed"),
    )
    checkpoint_interval_s: float = knob(1800.0, "Compute time between checkpoints when checkpoint_policy=fixed.")
    reschedule_s: float = knob(300.0, "Restart: time to tear down, reallocate nodes and relaunch all ranks.")
    load_s: float = knob(120.0, "Restart: time to load the checkpoint from durable storage.")
    warmup_s: float = knob(120.0, "Restart: time until steps run at full speed again (compile, NCCL init, data loader).")
    in_memory_recovery: bool = knob(
        False, "Keep each checkpoint in a peer node's memory; single-node failures restart from it (no storage load). "
        "Under --recovery replica each group snapshots its newest step to host memory, mirrored to a peer group.",
    )
    in_memory_load_s: float = knob(15.0, "Restart: time to load the checkpoint from a peer's memory when in_memory_recovery.")

    def stall_s(self) -> float:
        """Training time lost to one checkpoint (the part on the critical path)."""
        return self.checkpoint_s if self.checkpoint_mode == "sync" else self.async_stall_s

    def restart_s(self, from_memory: bool = False) -> float:
        return self.reschedule_s + (self.in_memory_load_s if from_memory else self.load_s) + self.warmup_s

    def validate(self) -> None:
        if not self.step_time_s > 0:
            raise UserError(f"step_time_s={self.step_time_s} must be > 0; pass the measured or planned step time")
        if not self.tokens_per_step > 0:
            raise UserError(f"tokens_per_step={self.tokens_per_step} must be > 0")
        for name in ("checkpoint_s", "async_stall_s", "reschedule_s", "load_s", "warmup_s", "in_memory_load_s"):
            _non_negative(name, getattr(self, name))
        if self.checkpoint_policy == "fixed" and not self.checkpoint_interval_s > 0:
            raise UserError(f"checkpoint interval {self.checkpoint_interval_s} s must be > 0; pass a positive --checkpoint-interval")
        if self.checkpoint_mode == "async" and self.async_stall_s > self.checkpoint_s:
            raise UserError(f"async_stall_s={self.async_stall_s} exceeds checkpoint_s={self.checkpoint_s}; an async stall is a part of the write")


@dataclass
class SimSpec:
    """How long, how often, and what to record."""

    days: float = knob(90.0, "Simulated wall-clock days of the training run.")
    seeds: int = knob(1, "Independent runs (seed, seed+1, ...); results report the mean and spread.")
    seed: int = knob(0, "First random seed; the same seed gives the same result.")
    timeline: bool = knob(False, "Record every state interval (needed for the timeline plot).")

    @property
    def horizon_s(self) -> float:
        return self.days * DAY_S

    def validate(self) -> None:
        if not (isinstance(self.days, (int, float)) and 0 < self.days <= MAX_DAYS):
            raise UserError(f"days={self.days} must be a number in (0, {MAX_DAYS:g}]")
        _positive_int("seeds", self.seeds)


@dataclass
class SimConfig:
    """Everything one `gigafactory simulate` run reads."""

    cluster: ClusterSpec = dataclasses.field(default_factory=ClusterSpec)
    job: JobSpec = dataclasses.field(default_factory=JobSpec)
    sim: SimSpec = dataclasses.field(default_factory=SimSpec)
    recovery: RecoverySpec = dataclasses.field(default_factory=RecoverySpec)

    def validate(self) -> None:
        self.cluster.validate()
        self.job.validate()
        self.sim.validate()
        self.recovery.validate(self.cluster.gpus, self.cluster.gpus_per_node)

    @property
    def groups(self) -> int:
        """Replica groups (1 under job-restart)."""
        return self.recovery.groups(self.cluster.gpus, self.cluster.gpus_per_node)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={value!r} must be a finite number >= 0")
