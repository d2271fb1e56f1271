"""NaN/Inf and loss-spike detection, with a re-run to tell a transient fault from a real anomaly, and an action
from the config for the real ones: skip, rollback or stop.

The trainer calls `AnomalyGuard.check(step, loss, grad_norm)` after backward and gradient clipping, before
`optimizer.step()`, with the *global* loss (all-reduced mean) and the global gradient norm: every rank sees the same
numbers and takes the same decision without another collective. On an anomaly, and with `resilience.rerun_anomalies`,
it re-runs the step on the same batch and calls `judge_rerun` (Megatron's rerun state machine): a clean re-run means
the first result was a transient fault (a flipped bit, a bad link) and the re-run's update is kept; a re-run that
shows the anomaly again means the batch or the state is at fault, and the configured action follows:

    "ok"       step the optimizer as usual
    "skip"     zero the gradients and do not step (the batch is consumed; the data position moves on)
    "rollback" reload the newest good checkpoint (weights, optimizer, this detector) and go on from there on fresh
               data, past the batches consumed since (PaLM's recipe: replaying them would reproduce the anomaly)
    "stop"     stop training with a non-zero exit (save nothing: the state may be bad)

A loss that was judged a spike still enters the window once acted on, so a lasting change of level is learned
instead of skipping every later step. Rollbacks for anomalies at the same step are limited by `max_rollbacks`; one
more stops training. The window and the rollback counts travel in checkpoints (`state_dict`), so a restart or a
rollback resumes the detector exactly where the checkpoint left it (rollback counts are kept across a rollback).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gigafactory.config.job import ResilienceConfig
from gigafactory.resilience.events import EventLog


@dataclass
class Verdict:
    action: str  # ok | rerun | skip | rollback | stop
    reason: str = ""  # nan | spike | "" (for ok after a clean re-run: the transient anomaly's reason)
    zscore: float = 0.0
    note: str = ""


class SpikeDetector:
    """z = (loss - mean) / std over the last `window` losses; a spike is z > zscore (0 = off)."""

    def __init__(self, zscore: float, window: int):
        self.zscore, self.window = zscore, window
        self.history: deque[float] = deque(maxlen=window)

    def score(self, loss: float) -> float:
        if self.zscore <= 0 or len(self.history) < self.window:
            return 0.0
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        return (loss - mean) / max(std, 1e-8 * max(1.0, abs(mean)))

    def is_spike(self, loss: float) -> tuple[bool, float]:
        z = self.score(loss)
        return (self.zscore > 0 and z > self.zscore), z

    def accept(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)


class AnomalyGuard:
    def __init__(self, cfg: ResilienceConfig, events: EventLog | None = None):
        self.cfg, self.events = cfg, events
        self.spikes = SpikeDetector(cfg.spike_zscore, cfg.spike_window)
        self.rollbacks_at: dict[int, int] = {}

    def inspect(self, loss: float, grad_norm: float) -> tuple[str, float]:
        """("nan" | "spike" | "", z-score) of one result, without changing any state."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nan", 0.0
        spike, z = self.spikes.is_spike(loss)
        return ("spike" if spike else ""), z

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """The verdict on a step's first run: "ok", "rerun" (an anomaly, with rerun_anomalies on: re-run the step on
        the same batch and pass the result to `judge_rerun`), or the configured action for the anomaly."""
        reason, z = self.inspect(loss, grad_norm)
        if not reason:
            self.spikes.accept(loss)
            return Verdict("ok", zscore=z)
        if self.cfg.rerun_anomalies:
            return Verdict("rerun", reason, z)
        return self._act(step, reason, loss=loss, grad_norm=grad_norm, zscore=z)

    def judge_rerun(self, step: int, first: Verdict, first_loss: float, loss: float, grad_norm: float) -> Verdict:
        """The verdict after re-running an anomalous step on the same batch."""
        reason, z = self.inspect(loss, grad_norm)
        if not reason:
            self.spikes.accept(loss)
            self._record("transient_fault", step=step, reason=first.reason, action="ok", first_loss=first_loss, loss=loss, grad_norm=grad_norm)
            return Verdict("ok", first.reason, z)
        return self._act(step, reason, loss=loss, grad_norm=grad_norm, zscore=z, first_loss=first_loss, reproduced=True)

    def _act(self, step: int, reason: str, **fields) -> Verdict:
        action = self.cfg.on_nan if reason == "nan" else self.cfg.on_spike
        note = ""
        if action == "rollback":
            done = self.rollbacks_at.get(step, 0)
            if done >= self.cfg.max_rollbacks:
                action, note = "stop", f"already rolled back {done} time(s) at step {step} (resilience.max_rollbacks={self.cfg.max_rollbacks})"
            else:
                self.rollbacks_at[step] = done + 1
        if reason == "spike" and action == "skip":
            self.spikes.accept(fields["loss"])  # a lasting change of level must not be skipped forever
        self._record(reason, step=step, action=action, **({"note": note} if note else {}), **fields)
        return Verdict(action, reason, float(fields.get("zscore", 0.0)), note)

    def _record(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.record(event, once=True, **{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in fields.items()})

    def state_dict(self) -> dict:
        return {"spikes": self.spikes.state_dict(), "rollbacks_at": sorted(self.rollbacks_at.items())}

    def load_state_dict(self, state: dict, keep_rollback_counts: bool = False) -> None:
        """Restore the window (and, unless kept, the rollback counts) from a checkpoint's `state_dict()`."""
        self.spikes.load_state_dict(state.get("spikes", {}))
        if not keep_rollback_counts:
            self.rollbacks_at = {int(s): int(n) for s, n in state.get("rollbacks_at", [])}
