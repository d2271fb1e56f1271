"""What the serving engines compute differently from the exported model, and by how much the logits move.

vLLM's and SGLang's Grok code hard-codes parts of the math that Grok-1's own code does differently
(/work/shared/reference/grok1-architecture.md §4): a 30·tanh(x/30) router cap (Grok-1 has none), the exact erf GELU
in the fused MoE kernel (Grok-1 uses the tanh form) and, in vLLM versions before the config was read, renormalised
top-k gates. An export cannot change the engines, so `gigafactory export` says so, with the size of the difference
measured on the exported weights: the model run as trained against the same weights run with the engine's math.
vLLM's built-in Grok was removed after v0.24; current vLLM serves hf-grok1 / sglang-grok exports through our plugin
(interop/vllm_grok), which computes the model exactly, so the hf-grok1 lines name the old built-in code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gigafactory.models.config import ModelConfig

ENGINE_ROUTER_CAP = 30.0
MEASURE_MAX_PARAMS = 300_000_000  # above this the measurement (a CPU forward of the whole model) is skipped


def engine_deviations(fmt: str, cfg: ModelConfig) -> list[str]:
    """One phrase per way the engine behind `fmt` computes something else than `cfg` (empty: exact)."""
    if fmt not in ("hf-grok1", "sglang-grok"):
        return []
    engine = "vLLM <= 0.24's built-in Grok" if fmt == "hf-grok1" else "SGLang"
    out = []
    if cfg.router_softcap != ENGINE_ROUTER_CAP:
        out.append(f"{engine} caps router logits at {ENGINE_ROUTER_CAP:g} (the model: {cfg.router_softcap:g})")
    if cfg.activation == "gelu_tanh":
        out.append(f"{engine}'s fused MoE uses the exact erf GELU (the model: the tanh approximation)")
    if fmt == "hf-grok1" and not cfg.router_renormalize:
        out.append("vLLM versions that ignore moe_renormalize renormalise the top-k gates (the model does not)")
    return out


@torch.no_grad()
def measure_deviation(checkpoint: str | Path, fmt: str, tokens: int = 64, seed: int = 0) -> tuple[float, float] | None:
    """(max |Δ logit|, std of the logits) between the checkpoint's model and the same weights under `fmt`'s engine
    math, in fp32 on random tokens; None when there is nothing to measure or the model is too big to run here."""
    from gigafactory.interop.storage import GigafactorySource
    from gigafactory.models import GrokModel
    from gigafactory.models.grok.moe import Experts, Router
    from gigafactory.train.checkpoint import load_checkpoint

    source = GigafactorySource(checkpoint)
    cfg = source.cfg
    if not engine_deviations(fmt, cfg):
        return None
    with torch.device("meta"):
        model = GrokModel(cfg)
    if sum(p.numel() for p in model.parameters()) > MEASURE_MAX_PARAMS:
        return None
    model.to_empty(device="cpu")
    model.reset_buffers()
    load_checkpoint(source.path, model)
    model.float().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, min(tokens, cfg.max_seq_len)), generator=torch.Generator().manual_seed(seed))
    ours = model(ids).float()
    for module in model.modules():  # the engine's math on the same weights
        if isinstance(module, Router):
            module.softcap = ENGINE_ROUTER_CAP
            module.renormalize = module.renormalize or fmt == "hf-grok1"
        if isinstance(module, Experts) and cfg.activation == "gelu_tanh":
            module.act = F.gelu
    theirs = model(ids).float()
    return (theirs - ours).abs().max().item(), ours.std().item()


def deviation_warnings(checkpoint: str | Path, fmt: str, cfg: ModelConfig) -> list[str]:
    """The lines `gigafactory export` prints: each engine deviation, then the measured effect on the logits."""
    found = engine_deviations(fmt, cfg)
    if not found:
        return []
    measured = measure_deviation(checkpoint, fmt)
    size = (f"on this checkpoint the logits differ by up to {measured[0]:.3g} (logit std {measured[1]:.3g}; fp32, random tokens)"
            if measured else f"not measured: the model has more than {MEASURE_MAX_PARAMS:,} parameters")
    exact = " current vLLM with gigafactory's plugin (scripts/setup-vllm.sh) computes the model exactly;" if fmt == "hf-grok1" else ""
    return [*found, f"together: {size};{exact} docs/interop.md, 'Engine deviations'"]
