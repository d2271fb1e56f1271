"""Stop on SIGTERM or Ctrl-C the way schedulers expect: finish the step, save, exit — within a grace period.

Slurm time limits and preemption, Kubernetes evictions and torchrun's agent send SIGTERM (then SIGKILL after a
grace period); a user presses Ctrl-C (SIGINT). The handler only sets a flag: the training loop ends after the step
in flight, saves a checkpoint and exits. Ranks may see the signal between different steps, so the loop asks
`requested()` — an all-reduce (MAX) of the flag — and every rank stops after the same step. If saving takes longer
than `grace_s`, a timer exits the process anyway (the previous checkpoint is intact: saves are atomic). A second
Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from gigafactory.resilience import EventLog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self, grace_s: float, events: EventLog | None = None):
        self.grace_s, self.events = grace_s, events
        self.signum: int | None = None
        self.step = 0  # the step in flight, for the event record
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.events is not None:
            self.events.record("signal", signal=signal.Signals(signum).name, step=self.step + 1, grace_s=self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._out_of_time)
        self._timer.daemon = True
        self._timer.start()

    def _out_of_time(self) -> None:
        print(f"gigafactory: {self.name}: no clean stop within resilience.term_grace_s={self.grace_s:g} s; exiting "
              "without a final checkpoint (the previous one is intact)", file=sys.stderr, flush=True)
        os._exit(128 + int(self.signum or signal.SIGTERM))

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank got a stop signal (collective under torch.distributed)."""
        flag = self.signum is not None
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t.item())  # one host read
        if signum and self.signum is None:  # a peer got it first: stop too, under the same grace
            self._handle(signum, None)
        return bool(signum)
