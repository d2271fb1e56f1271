"""Post-training options that CLI parsers read without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Preference-tuning settings that differ from pre-training's; a --section.key flag still wins.
DPO_DEFAULTS = {"optimizer.lr": 1e-4, "optimizer.warmup_steps": 5, "optimizer.weight_decay": 0.0, "training.steps": 50,
                "training.eval_every": 25}


@dataclass
class DPOOptions:
    """The preference objective's settings (flags of `gigafactory dpo`)."""

    beta: float = knob(0.1, "Strength of the KL tie to the reference: the implicit reward is beta * log(pi / ref).")
    label_smoothing: float = knob(0.0, "Probability that a preference label is flipped (conservative DPO); 0 = plain DPO.")
    loss_type: str = knob("sigmoid", "sigmoid (DPO), ipo or hinge.", choices=LOSS_TYPES)

    def validate(self) -> None:
        if not self.beta > 0:
            raise UserError(f"--beta {self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss-type {self.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
