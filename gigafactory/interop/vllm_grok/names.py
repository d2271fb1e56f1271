"""Export tensor names -> the vLLM Grok model's parameters, for the two Grok layouts (interop/layouts.py).

Pure Python (no vLLM), so the mapping is tested in the main test suite against what `gigafactory export` writes.
Every name is mapped or refused: vLLM's own loaders skip unknown names silently, which would serve a model with a
tensor missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NORMS = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")


@dataclass(frozen=True)
class Target:
    """Where one exported tensor goes: `param` (a parameter name, or the fused-MoE module when `expert` is set),
    `shard` for fused parameters (q/k/v of qkv_proj, 0/1 of the dense gate_up_proj), `expert` the name handed to
    vLLM's fused-MoE loader ("<e>.w1.weight")."""

    param: str
    shard: str | int | None = None
    expert: str | None = None


# vLLM's fused-MoE loader is given every expert tensor under Mixtral's names (gate w1, down w2, up w3).
FUSED_MOE_NAMES = ("w1", "w2", "w3")


@dataclass(frozen=True)
class ExportNames:
    fmt: str
    attn: str  # attention module name in the export
    moe: str  # MoE block name
    expert_names: tuple[str, str, str]  # the export's (gate, down, up), in FUSED_MOE_NAMES' order
    norm_param: str  # "scale" (hf-grok1) or "weight"
    explicit_lm_head: bool  # sglang-grok always writes lm_head (a copy of a tied embedding)

    def translate(self, name: str) -> Target:
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            return Target(name)
        if name == f"model.norm.{self.norm_param}":
            return Target("model.norm.weight")
        match = _LAYER.match(name)
        target = self._layer(f"model.layers.{match.group(1)}", match.group(2)) if match else None
        if target is None:
            raise ValueError(f"tensor {name!r} is not part of a Gigafactory {self.fmt} export")
        return target

    def _layer(self, base: str, rest: str) -> Target | None:
        gate, down, up = self.expert_names
        for proj in ("q", "k", "v"):
            if rest == f"{self.attn}.{proj}_proj.weight":
                return Target(f"{base}.self_attn.qkv_proj.weight", proj)
        if rest == f"{self.attn}.o_proj.weight":
            return Target(f"{base}.self_attn.o_proj.weight")
        if rest == f"{self.moe}.gate.weight":
            return Target(f"{base}.moe.gate.weight")
        expert = re.fullmatch(rf"{self.moe}\.experts\.(\d+)\.({gate}|{down}|{up})\.weight", rest)
        if expert:
            fused = FUSED_MOE_NAMES[self.expert_names.index(expert.group(2))]
            return Target(f"{base}.moe.experts", expert=f"{expert.group(1)}.{fused}.weight")
        for norm in _NORMS:
            if rest == f"{norm}.{self.norm_param}":
                return Target(f"{base}.{norm}.weight")
        if self.fmt == "sglang-grok":  # Grok-2's dense FFN
            for shard, proj in enumerate(("gate", "up")):
                if rest == f"mlp.{proj}_proj.weight":
                    return Target(f"{base}.mlp.gate_up_proj.weight", shard)
            if rest == "mlp.down_proj.weight":
                return Target(f"{base}.mlp.down_proj.weight")
        return None


_FORMATS = {
    "hf-grok1": ExportNames("hf-grok1", "attn", "moe_block", ("linear", "linear_1", "linear_v"), "scale", False),
    "sglang-grok": ExportNames("sglang-grok", "self_attn", "block_sparse_moe", ("w1", "w2", "w3"), "weight", True),
}


def export_names(fmt: str | None) -> ExportNames:
    if fmt not in _FORMATS:
        raise ValueError(f"config.json's gigafactory.format is {fmt!r}; this vLLM model serves {' and '.join(_FORMATS)} exports")
    return _FORMATS[fmt]
