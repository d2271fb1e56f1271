"""The heartbeat file: rank 0's last completed step, rewritten atomically after every step.

The watchdog writes it; the next attempt reads it to tell how many steps a failure cost (events.record_start)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def attempt() -> int:
    """torchrun's restart counter (0 outside torchrun or on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def write_heartbeat(path: Path | str, step: int, finished: bool = False) -> None:
    """Atomically replace the heartbeat file with {step, time, attempt, pid, finished}."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "attempt": attempt(), "pid": os.getpid(), "finished": finished}))
    tmp.replace(path)


def read_heartbeat(path: Path | str) -> dict | None:
    try:
        beat = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None
