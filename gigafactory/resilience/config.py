"""Config sections for resilience (`[resilience]`) and fault injection for tests and drills (`[faults]`)."""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.models.config import ConfigError

ACTIONS = ("skip", "rollback", "stop")


@dataclass
class ResilienceConfig:
    """Failure detection and recovery: watchdog, NaN/spike handling, restarts, async checkpoints, stragglers."""

    watchdog_timeout_s: float = knob(600.0, "A rank that completes no step for this long is declared hung and exits non-zero, so torchrun restarts the job; 0 = off.")
    on_nan: str = knob("skip", "NaN/Inf in the loss or gradient norm: skip the optimizer step, roll back to the last checkpoint, or stop.", choices=ACTIONS)
    spike_zscore: float = knob(6.0, "A loss more than this many standard deviations above the recent mean is a spike; 0 = off.")
    spike_window: int = knob(50, "Number of recent losses the spike detector's mean and deviation are computed over.")
    on_spike: str = knob("skip", "What a loss spike triggers: skip the optimizer step, roll back to the last checkpoint, or stop.", choices=ACTIONS)
    max_rollbacks: int = knob(3, "Rollbacks allowed for anomalies at the same step before training stops instead.")
    max_restarts: int = knob(3, "Restart budget of torchrun's elastic agent (--max-restarts) for `gigafactory train --nproc N`.")
    async_checkpoint: bool = knob(False, "Save checkpoints with DCP async_save: the step waits only for the copy to host memory.")
    verify: str = knob("sha256", "How a checkpoint is checked against its manifest before loading: sha256, size (fast), or none.", choices=("sha256", "size", "none"))
    straggler_every: int = knob(100, "Gather per-rank step times every N steps and name the slowest ranks; 0 = off.")
    straggler_ratio: float = knob(1.2, "A rank whose mean step time exceeds the median by this factor is reported as a straggler.")
    events_file: str = knob("events.jsonl", "Recovery events log, relative to logging.run_dir (read by `gigafactory report`).")

    def validate(self) -> None:
        checks = [
            ("watchdog_timeout_s", self.watchdog_timeout_s >= 0, "must be >= 0 (0 = off)"),
            ("spike_zscore", self.spike_zscore >= 0, "must be >= 0 (0 = off)"),
            ("spike_window", self.spike_window >= 2, "must be >= 2"),
            ("max_rollbacks", self.max_rollbacks >= 0, "must be >= 0"),
            ("max_restarts", self.max_restarts >= 0, "must be >= 0"),
            ("straggler_every", self.straggler_every >= 0, "must be >= 0 (0 = off)"),
            ("straggler_ratio", self.straggler_ratio >= 1, "must be >= 1"),
            ("on_nan", self.on_nan in ACTIONS, f"must be one of {ACTIONS}"),
            ("on_spike", self.on_spike in ACTIONS, f"must be one of {ACTIONS}"),
        ]
        for key, ok, fix in checks:
            if not ok:
                raise ConfigError(f"resilience.{key}={getattr(self, key)!r} {fix}")


@dataclass
class FaultConfig:
    """Deliberate failures for tests and drills. Steps count from 1; 0 = off. Each fault fires once per run directory."""

    kill_rank: int = knob(0, "Rank that SIGKILLs itself at kill_step (after its backward pass, mid-step).")
    kill_step: int = knob(0, "Step at which kill_rank is killed; 0 = never.")
    hang_rank: int = knob(0, "Rank that stops making progress at hang_step (sleeps forever before the step).")
    hang_step: int = knob(0, "Step at which hang_rank hangs; 0 = never.")
    nan_rank: int = knob(0, "Rank whose gradient gets a NaN at nan_step.")
    nan_step: int = knob(0, "Step whose gradients get a NaN (after backward, before clipping); 0 = never.")
    corrupt_latest: str = knob("none", "Damage the checkpoint saved at corrupt_step right after it is written.", choices=("none", "truncate", "flip"))
    corrupt_step: int = knob(0, "Step whose checkpoint is damaged; 0 = the first checkpoint saved.")
    fail_save_step: int = knob(0, "The save at this step fails with OSError(ENOSPC) before it is committed; 0 = never.")

    @property
    def any(self) -> bool:
        return bool(self.kill_step or self.hang_step or self.nan_step or self.corrupt_latest != "none" or self.fail_save_step)

    def validate(self) -> None:
        for key in ("kill_rank", "kill_step", "hang_rank", "hang_step", "nan_rank", "nan_step", "corrupt_step", "fail_save_step"):
            if getattr(self, key) < 0:
                raise ConfigError(f"faults.{key}={getattr(self, key)} must be >= 0")
        if self.corrupt_latest not in ("none", "truncate", "flip"):
            raise ConfigError(f"faults.corrupt_latest={self.corrupt_latest!r} must be none, truncate or flip")
