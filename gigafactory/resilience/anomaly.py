"""NaN/Inf and loss-spike detection, each answering with an action from the config: skip, rollback or stop.

Call `AnomalyGuard.check(step, loss, grad_norm)` after backward and gradient clipping, before `optimizer.step()`,
with the *global* loss (all-reduced mean) and the global gradient norm: every rank then sees the same numbers and
takes the same decision without another collective.

    "ok"       step the optimizer as usual
    "skip"     zero the gradients and do not step (the batch is consumed; the data position moves on)
    "rollback" reload the newest good checkpoint (weights, optimizer, data position) and go on from there
    "stop"     stop training cleanly (save nothing: the state may be bad)

A rollback replays the same data, so a deterministic NaN would recur: after `max_rollbacks` rollbacks for the same
step the guard answers "skip" instead, and the event says so. Spikes are judged against a window of recent losses
that excludes earlier spikes (Megatron-style z-score); the window needs `spike_window` losses before it judges.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gigafactory.resilience.config import ResilienceConfig
from gigafactory.resilience.events import EventLog


@dataclass
class Verdict:
    action: str  # ok | skip | rollback | stop
    reason: str = ""  # nan | spike | ""
    zscore: float = 0.0


class SpikeDetector:
    """z = (loss - mean) / std over the last `window` accepted losses; a spike is z > zscore (0 = off)."""

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

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._act(step, "nan", self.cfg.on_nan, loss=loss, grad_norm=grad_norm)
        spike, z = self.spikes.is_spike(loss)
        if spike:
            return self._act(step, "spike", self.cfg.on_spike, loss=loss, grad_norm=grad_norm, zscore=z)
        self.spikes.accept(loss)
        return Verdict("ok")

    def _act(self, step: int, reason: str, action: str, **fields) -> Verdict:
        note = ""
        if action == "rollback":
            done = self.rollbacks_at.get(step, 0)
            if done >= self.cfg.max_rollbacks:
                action, note = "skip", f"{done} rollbacks at this step already"
            else:
                self.rollbacks_at[step] = done + 1
        if self.events is not None:
            self.events.record(reason, once=True, step=step, action=action, **({"note": note} if note else {}),
                               **{k: (v if math.isfinite(v) else str(v)) for k, v in fields.items()})
        return Verdict(action, reason, float(fields.get("zscore", 0.0)))
