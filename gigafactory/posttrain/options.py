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
    sft_weight: float = knob(0.0, "Weight of the chosen reply's per-token negative log-likelihood added to the loss (RPO, "
                             "Pang et al. 2024): keeps DPO from lowering the chosen answer's likelihood; 0 = plain DPO.")

    def validate(self) -> None:
        if not self.beta > 0:
            raise UserError(f"--beta {self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.sft_weight < 0:
            raise UserError(f"--sft-weight {self.sft_weight} must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss-type {self.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")


MAX_LORA_SCALE = 65504.0  # the largest float16: a larger alpha / r overflows to inf, and inf * (B = 0) is NaN
LORA_TARGETS = "wq,wk,wv,wo,w_gate,w_up,w_down"  # attention projections; dense-FFN linears and MoE experts' 3-D weights


@dataclass
class LoRAOptions:
    """Low-rank adapters instead of a full fine-tune (flags --lora.rank, --lora.alpha, --lora.targets)."""

    rank: int = knob(0, "Adapter rank r; 0 = full fine-tune (every weight trains).")
    alpha: float = knob(16.0, "Adapter scale numerator: the update is (alpha / r) * B A.")
    targets: str = knob(LORA_TARGETS, "Comma-separated names of the weights that get adapters: linear layers by the last part of "
                        "the module name; w_gate, w_up, w_down also name the MoE experts' stacked weights (one adapter per expert).")

    def target_names(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> None:
        if self.rank < 0:
            raise UserError(f"--lora.rank {self.rank} must be >= 0 (0 = full fine-tune)")
        if self.rank and not 0 < self.alpha / self.rank <= MAX_LORA_SCALE:
            raise UserError(f"--lora.alpha {self.alpha} must be > 0 and at most {MAX_LORA_SCALE:g} x --lora.rank (the "
                            f"update's scale alpha / r multiplies activations in the compute dtype); e.g. 2 x rank")
        if self.rank and not self.target_names():
            raise UserError("--lora.targets names no layer; e.g. wq,wk,wv,wo")
