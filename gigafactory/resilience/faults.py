"""Fault injection for tests and drills, driven by `FaultConfig` (`[faults]` in the job config).

The trainer calls the injector at four fixed points; each fault fires at most once per run directory (a marker
file under RUN_DIR/faults/ is written before it fires), so a restarted job does not hit the same fault again:

    before_step(step)          hang_rank sleeps forever at hang_step (the watchdog must catch it); delay_rank sleeps
                               delay_s before every step from delay_from_step on (a slow node)
    after_backward(step, model) nan_rank writes NaN into a gradient at nan_step; spike_rank scales its gradients (and,
                               through the returned factor, its loss) at spike_step; kill_rank SIGKILLs itself at kill_step
    before_save(step)          the save at fail_save_step raises OSError(ENOSPC) before it is committed
    after_save(step, path)     the checkpoint of corrupt_step is truncated or has one byte flipped

`step` is the number of the step being run (1 for the first), the same number the checkpoint is saved under.
NaN and spike faults fire on `anomaly_repeats` runs of their step: 1 stands for a transient hardware fault (a re-run
of the step is clean), 2 or more for a fault in the data (the re-run shows it again).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from gigafactory.config.job import FaultConfig
from gigafactory.resilience.events import EventLog


class FaultInjector:
    def __init__(self, cfg: FaultConfig, rank: int, run_dir: Path | str | None = None, events: EventLog | None = None):
        self.cfg, self.rank, self.events = cfg, rank, events
        self.marker_dir = Path(run_dir) / "faults" if run_dir else None
        self._fired: dict[str, int] = {}
        self._first_save_seen = False

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _arm(self, kind: str, step: int, times: int = 1, **fields) -> bool:
        """True (and the firing recorded) if `kind` has fired fewer than `times` times for this run directory."""
        marker = self.marker_dir / kind if self.marker_dir else None
        fired = self._fired.get(kind, 0)
        if marker is not None and marker.exists():
            fired = max(fired, len(marker.read_text().splitlines()))
        if fired >= times:
            return False
        self._fired[kind] = fired + 1
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with open(marker, "a") as f:
                f.write(f"step {step} rank {self.rank}\n")
        if self.events is not None:
            self.events.record("fault_injected", kind=kind, step=step, **fields)
        return True

    # ---- hooks -------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        c = self.cfg
        if c.delay_s and c.delay_rank in (-1, self.rank) and step >= c.delay_from_step:
            time.sleep(c.delay_s)
        if c.hang_step and step == c.hang_step and self.rank == c.hang_rank and self._arm("hang", step):
            while True:  # a hung rank: alive, never progressing
                time.sleep(3600)

    def after_backward(self, step: int, model) -> float:
        """Inject this step's gradient faults; returns the factor this rank's loss is to be multiplied by."""
        c, factor = self.cfg, 1.0
        if c.nan_step and step == c.nan_step and self.rank == c.nan_rank and self._arm("nan", step, c.anomaly_repeats):
            for g in _local_grads(model):
                g.view(-1)[0] = float("nan")
                break
        if c.spike_step and step == c.spike_step and self.rank == c.spike_rank and self._arm("spike", step, c.anomaly_repeats, scale=c.spike_scale):
            for g in _local_grads(model):
                g.mul_(c.spike_scale)
            factor = c.spike_scale
        if c.kill_step and step == c.kill_step and self.rank == c.kill_rank and self._arm("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        return factor

    def before_save(self, step: int) -> None:
        c = self.cfg
        if c.fail_save_step and step == c.fail_save_step and self._arm("fail_save", step):
            raise disk_full_error(f"injected at step {step}")

    def after_save(self, step: int, path: Path | str | None) -> None:
        """Call on rank 0 (or all ranks: only rank 0 acts) once the checkpoint of `step` is committed."""
        c = self.cfg
        if c.corrupt_latest == "none" or path is None or self.rank != 0:
            return
        first = not self._first_save_seen
        self._first_save_seen = True
        if (c.corrupt_step == 0 and first) or step == c.corrupt_step:
            if self._arm("corrupt", step, mode=c.corrupt_latest, path=str(path)):
                corrupt_checkpoint(Path(path), c.corrupt_latest)


def _local_grads(model):
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if g.numel():
                yield g


def disk_full_error(path: Path | str = "") -> OSError:
    """The OSError a full disk raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def corrupt_checkpoint(ckpt_dir: Path, mode: str) -> Path:
    """Damage the largest DCP shard (`*.distcp`) of a checkpoint: 'truncate' drops its second half, 'flip' inverts
    one byte."""
    files = [p for p in Path(ckpt_dir).glob("*.distcp") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    if mode == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
    elif mode == "flip":
        with open(target, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        raise ValueError(f"unknown corruption mode {mode!r}")
    return target
