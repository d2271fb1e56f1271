"""Smoothing the facility's power swing from the trainer: a floor of filler work while the job pauses alive, and a
ramp at start-up (docs/operations.md, "Power").

A synchronous job moves every GPU between busy and near-idle at once: when it stops for a checkpoint save, while
it loads at a (re)start, and when it starts computing again. At 100k GPUs that is tens of MW in about a second.

- Floor (`resilience.power_floor` = f): while a save or the start-up load runs, a background thread keeps the
  device busy a fraction f of the time with matmuls on a stream of its own (bursts of f x 50 ms every 50 ms), so
  the board draws roughly idle + f x (busy - idle) instead of idle. Cost: that work is thrown away, about
  (f x busy - idle) W per GPU for the length of every pause; it cannot help after a crash (no process is left).
- Ramp (`resilience.power_ramp_s` = R): after a (re)start, each step is followed by a sleep so that the fraction
  of time spent computing rises linearly from d0 = max(f, 0.1) to 1 over the first R seconds of training. Cost:
  about R x (1 - d0)^2 / 2 seconds of training per start (the watchdog is paused while it sleeps).

The duty cycle sets the average draw over tens of milliseconds, not a measured wattage; where NVML exists the
board power per rank is logged (train/metrics.py `BoardPower`), so the effect can be checked.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

BURST_PERIOD_S = 0.05
MIN_START_DUTY = 0.1  # the ramp starts at max(floor, this): from 0 the first step would wait forever


class PowerFloor:
    """Filler work at duty `fraction` on `device` between start() and stop(); a no-op for fraction 0."""

    def __init__(self, fraction: float, device: torch.device):
        self.fraction, self.device = fraction, device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy_s = 0.0  # filler time actually spent (tests, logs)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self.fraction <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="power-floor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    @contextlib.contextmanager
    def held(self):
        self.start()
        try:
            yield
        finally:
            self.stop()

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        n, dtype = (4096, torch.bfloat16) if cuda else (128, torch.float32)
        stream = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            while not self._stop.is_set():
                start = time.perf_counter()
                while time.perf_counter() - start < self.fraction * BURST_PERIOD_S and not self._stop.is_set():
                    a @ b
                    if cuda:
                        stream.synchronize()
                spent = time.perf_counter() - start
                self.busy_s += spent
                self._stop.wait(spent * (1.0 - self.fraction) / self.fraction)  # the duty holds even if a burst overran


class PowerSmoothing:
    """The trainer's hooks: `paused()` around saves, `starting()` before the load, `step_done(elapsed)` after steps."""

    def __init__(self, floor: float, ramp_s: float, device: torch.device):
        self.floor, self.ramp_s = floor, ramp_s
        self.filler = PowerFloor(floor, device)
        self._ramp_start: float | None = None
        self.throttled_s = 0.0  # time slept by the ramp

    def paused(self):
        """Hold the floor while the job pauses alive (a checkpoint save)."""
        return self.filler.held()

    def starting(self) -> None:
        """A (re)start: hold the floor through the load until the first step."""
        self.filler.start()

    def duty(self, since_start_s: float) -> float:
        """Fraction of time to compute, `since_start_s` into training: floor -> 1 over ramp_s."""
        if self.ramp_s <= 0 or since_start_s >= self.ramp_s:
            return 1.0
        start = max(self.floor, MIN_START_DUTY)
        return start + (1.0 - start) * since_start_s / self.ramp_s

    def step_done(self, elapsed_s: float) -> float:
        """After a step: the first one ends the start-up floor; during the ramp, sleep so the step's share of the
        time is the ramp's duty. Returns the seconds slept."""
        self.filler.stop()
        now = time.monotonic()
        if self._ramp_start is None:
            self._ramp_start = now - elapsed_s
        duty = self.duty(now - self._ramp_start)
        if duty >= 1.0:
            return 0.0
        pause = min(elapsed_s * (1.0 / duty - 1.0), self._ramp_start + self.ramp_s - now)  # never past the ramp's end
        time.sleep(pause)
        self.throttled_s += pause
        return pause

    def close(self) -> None:
        self.filler.stop()
