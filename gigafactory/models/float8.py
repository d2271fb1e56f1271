"""Float8 training: swap a model's eligible linear layers for torchao's Float8Linear before it is parallelised.

Float8 GEMMs run the attention and dense projections with per-row (or per-tensor) scales computed on the fly; the
master weights, the optimizer, norms, the router (fp32), the output head and the softmax stay in the compute dtype.
The experts' grouped GEMMs stay in the compute dtype (torchao's float8 grouped GEMM is a CUDA SM 9.0+ prototype that
has not been run here); `Float8Report.kept` names them. The swap keeps every parameter's name and shape, so a
float8 run's checkpoints load into a bf16 model (serve, export, resume with the other precision).

torchao is imported only when float8 is asked for: the default install never needs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from gigafactory.errors import UserError

RECIPES = ("rowwise", "tensorwise")
# torch._scaled_mm needs both GEMM dimensions to be multiples of 16.
ALIGNMENT = 16
# Kept in the compute dtype whatever their shape: the output head (its logits feed a softmax over the vocabulary and
# its gradient is the largest in the model, the usual choice of torchtitan and Megatron).
KEPT_BY_NAME = ("lm_head",)


@dataclass
class Float8Report:
    """Which GEMMs run in float8 and which stay in the compute dtype, and why (printed at start-up)."""

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        reasons = sorted(set(self.kept.values()))
        return f"float8: {len(self.converted)} linear layers converted; kept in the compute dtype: " + (
            "; ".join(f"{sum(r == v for v in self.kept.values())} x {r}" for r in reasons) or "nothing")


def _torchao():
    # torchao logs a warning for each of its CUDA kernel libraries a CPU build cannot load; they are not used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao import float8
    except ImportError as err:  # the [fp8] extra is not installed
        raise UserError("training.precision=fp8 needs torchao: pip install 'gigafactory[fp8]' (or pip install torchao)") from err
    return float8


def convert_to_float8(model: nn.Module, recipe: str = "rowwise", fsdp_float8_all_gather: bool = False) -> Float8Report:
    """Swap eligible nn.Linear layers in place (works on a meta-device model); returns what was and was not swapped.

    `fsdp_float8_all_gather` casts weights to float8 before FSDP2 gathers them (half the all-gather bytes); torchao
    supports it with the tensorwise recipe only.
    """
    if recipe not in RECIPES:
        raise UserError(f"float8 recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise UserError("float8 all-gather under FSDP needs training.fp8_recipe=tensorwise (torchao scales rowwise weights per gather)")
    float8 = _torchao()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    report = Float8Report()

    def eligible(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if fqn.rpartition(".")[2] in KEPT_BY_NAME:
            report.kept[fqn] = "output head"
            return False
        if module.in_features % ALIGNMENT or module.out_features % ALIGNMENT:
            report.kept[fqn] = f"dimensions not multiples of {ALIGNMENT}"
            return False
        report.converted.append(fqn)
        return True

    float8.convert_to_float8_training(model, config=config, module_filter_fn=eligible)
    for fqn, module in model.named_modules():
        if type(module).__name__ == "Experts":
            report.kept[fqn] = "experts' grouped GEMM"
    return report
