"""Per-step heartbeat and a watchdog that turns a hang into a process exit, so torchrun restarts the job.

A hang has two shapes: a rank stops stepping (a deadlock, a stuck kernel, slow storage), or a collective never
completes because a peer is gone. The second is also bounded by the process-group timeout
(`init_process_group(timeout=...)`, `gigafactory.parallel.distributed.init_distributed(timeout_s=...)`), but that
default is 10 minutes and NCCL only honours it with async error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, the
default in recent torch). The watchdog covers both with one number: if no step completes within `timeout_s`, it
logs a `hang` event, dumps every thread's stack to stderr and calls `os._exit(EXIT_HANG)` — from a thread, since
the main thread may be blocked inside C++. torchrun's agent sees the non-zero exit, stops the other workers and
restarts the group (up to --max-restarts), and the job resumes from the newest good checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from gigafactory.resilience.events import EventLog
from gigafactory.resilience.heartbeat import write_heartbeat

EXIT_HANG = 75  # distinct from crashes (1), SIGKILL (-9) and user errors (2)


class Watchdog:
    """beat(step) after every completed step; a daemon thread exits the process when beats stop for timeout_s.

    paused() brackets work that legitimately takes longer than a step (evaluation, a synchronous save, resume,
    the first compiled step). heartbeat_path (rank 0's file is enough) lets the next attempt compute steps lost.
    `on_timeout` replaces the exit (tests); it receives the hang record."""

    def __init__(self, timeout_s: float, rank: int = 0, events: EventLog | None = None, heartbeat_path: Path | str | None = None,
                 on_timeout: Callable[[dict], None] | None = None, poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self.rank, self.events, self.heartbeat_path, self.on_timeout = rank, events, heartbeat_path, on_timeout
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(1.0, self.timeout_s / 20))
        self.step = 0
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self, step: int = 0) -> "Watchdog":
        self.step = step
        self._last = time.monotonic()
        if self.heartbeat_path:
            write_heartbeat(self.heartbeat_path, step)
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gigafactory-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()
        if self.heartbeat_path:
            write_heartbeat(self.heartbeat_path, step)

    @contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    def stop(self, finished: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if finished and self.heartbeat_path:
            write_heartbeat(self.heartbeat_path, self.step, finished=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._paused:
                continue
            stalled = time.monotonic() - self._last
            if stalled > self.timeout_s:
                self._fire(stalled)
                return

    def _fire(self, stalled: float) -> None:
        record = {"event": "hang", "rank": self.rank, "step": self.step + 1, "stalled_s": round(stalled, 3), "timeout_s": self.timeout_s}
        if self.events is not None:
            record = self.events.record("hang", step=self.step + 1, stalled_s=round(stalled, 3), timeout_s=self.timeout_s)
        self.fired = record
        if self.on_timeout is not None:
            self.on_timeout(record)
            return
        print(f"gigafactory watchdog: rank {self.rank} completed no step for {stalled:.1f} s (> {self.timeout_s:g} s) "
              f"after step {self.step}; exiting with code {EXIT_HANG} so torchrun restarts the job", file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except Exception:  # noqa: BLE001 - best effort diagnostics
            pass
        sys.stderr.flush()
        os._exit(EXIT_HANG)
