"""Fault injection for tests and drills, driven by `FaultConfig` (`[faults]` in the job config).

The trainer calls the injector at four fixed points; each fault fires at most once per run directory (a marker
file under RUN_DIR/faults/ is written before it fires), so a restarted job does not hit the same fault again:

    before_step(step)          hang_rank sleeps forever at hang_step (the watchdog must catch it)
    after_backward(step, model) nan_rank writes NaN into a gradient at nan_step; kill_rank SIGKILLs itself at kill_step
    before_save(step)          the save at fail_save_step raises OSError(ENOSPC) before it is committed
    after_save(step, path)     the checkpoint of corrupt_step is truncated or has one byte flipped

`step` is the number of the step being run (1 for the first), the same number the checkpoint is saved under.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from gigafactory.resilience.config import FaultConfig
from gigafactory.resilience.events import EventLog
from gigafactory.train.checkpoint import disk_full_error
from gigafactory.train.checkpoint_files import MANIFEST


class FaultInjector:
    def __init__(self, cfg: FaultConfig, rank: int, run_dir: Path | str | None = None, events: EventLog | None = None):
        self.cfg, self.rank, self.events = cfg, rank, events
        self.marker_dir = Path(run_dir) / "faults" if run_dir else None
        self._fired: set[str] = set()
        self._first_save_seen = False

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _arm(self, kind: str, step: int, **fields) -> bool:
        """True (and the fault recorded as fired) if `kind` has not fired yet for this run directory."""
        marker = self.marker_dir / kind if self.marker_dir else None
        if kind in self._fired or (marker is not None and marker.exists()):
            return False
        self._fired.add(kind)
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"step {step} rank {self.rank}\n")
        if self.events is not None:
            self.events.record("fault_injected", kind=kind, step=step, **fields)
        return True

    # ---- hooks -------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        c = self.cfg
        if c.hang_step and step == c.hang_step and self.rank == c.hang_rank and self._arm("hang", step):
            while True:  # a hung rank: alive, never progressing
                time.sleep(3600)

    def after_backward(self, step: int, model) -> None:
        c = self.cfg
        if c.nan_step and step == c.nan_step and self.rank == c.nan_rank and self._arm("nan", step):
            for p in model.parameters():
                if p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    if g.numel():
                        g.view(-1)[0] = float("nan")
                        break
        if c.kill_step and step == c.kill_step and self.rank == c.kill_rank and self._arm("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)

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


def corrupt_checkpoint(ckpt_dir: Path, mode: str) -> Path:
    """Damage the largest data file of a checkpoint: 'truncate' drops its second half, 'flip' inverts one byte."""
    files = [p for p in Path(ckpt_dir).iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
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
