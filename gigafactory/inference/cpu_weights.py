"""Weights laid out once for oneDNN's CPU GEMMs, the way vLLM prepares weights after loading and Inductor's
freezing pass prepacks them.

Serving multiplies a few rows (one per running request) by every weight of the model at every step. An fp32
`F.linear` or `grouped_mm` on CPU re-blocks its weight operand inside every call; a weight reordered once into
oneDNN's blocked layout is read straight. Measured on the mixtral-tiny engine (docs/benchmarks.md): a decode step of
8 / 32 requests ~15% / ~20% faster. The results equal the plain GEMMs' up to float rounding (a different summation
order), so packing is for inference only; training never sees these modules.
"""

from __future__ import annotations

import torch
from torch import nn

from gigafactory.models.grok.moe import Experts

# oneDNN picks the blocked layout for an expected row count; any count works, this one suits decode steps.
EXPECTED_ROWS = 16


def can_pack(model: nn.Module) -> bool:
    """oneDNN is built in and the model's weights are fp32 on the CPU (bf16 and GPUs keep their own kernels)."""
    weight = next(model.parameters(), None)
    return (weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _reorder(weight_OI: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach().contiguous(), EXPECTED_ROWS)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free nn.Linear over its prepacked weight. `weight` stays (the same tensor, not a copy) for code that
    reads it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.packed = _reorder(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed)


class PackedExperts(nn.Module):
    """Experts as one prepacked gate|up GEMM and one down GEMM per expert, over each expert's contiguous rows.
    Replaces `Experts` (same call: expert-sorted rows and the rows per expert); its fp32 weights are not kept."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.act = experts.act
        self.ffn_dim = experts.w_gate.shape[-1]
        # [E, D, F] (in, out) -> per expert [2F, D] and [D, F] (out, in), oneDNN's weight orientation
        self.gate_up = [_reorder(torch.cat([g, u], dim=1).t()) for g, u in zip(experts.w_gate, experts.w_up)]
        self.down = [_reorder(d.t()) for d in experts.w_down]

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, rows in enumerate(x_ND.split(tokens_per_expert_E.tolist())):  # counts are on the host: no sync
            if rows.shape[0]:
                gate, up = _packed_linear(rows, self.gate_up[e]).split(self.ffn_dim, dim=-1)
                outputs.append(_packed_linear(self.act(gate) * up, self.down[e]))
        return torch.cat(outputs) if outputs else x_ND.new_zeros(x_ND.shape)


def pack_for_cpu(model: nn.Module) -> bool:
    """Swap the model's linear layers and experts for prepacked ones, in place; False (nothing changed) when the
    model is not fp32 on a CPU with oneDNN. Packing an already packed model changes nothing."""
    if not can_pack(model):
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, PackedLinear(child))
            elif type(child) is Experts and child.low_rank is None:
                setattr(parent, name, PackedExperts(child))
    return True
