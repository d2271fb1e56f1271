"""Published large runs the planner is checked against, kept apart from the one it is calibrated on.

Calibration (fits `matmul_efficiency`, nothing else): Megatron-LM SC21 Table 1 (calibration.py).
Validation (never used to set a number): the runs below, each priced on the layout its paper reports. A figure a
paper does not give (microbatch size, virtual stages) is set to the stack's documented default and named here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gigafactory.plan.cost import StepEstimate, estimate
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.layout import CHECKPOINTING, MODERN, Layout
from gigafactory.plan.workload import Workload

MODELS = Path(__file__).with_name("models")


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    model: str  # a TOML under plan/models/
    gpu: str
    layout: Layout
    seq_len: int
    metric: str  # "mfu" (published MFU over the bf16 peak) or "tokens_per_gpu_s"
    published: float
    note: str = ""


# Llama 3: Table 4 (TP, CP, PP, DP, batch per DP, MFU); 1 sequence per microbatch, so microbatches = batch per DP;
# 126 layers over 16 stages with one layer fewer on the first and the last (section 3.3.2); FSDP that does not
# reshard weights after the forward and accumulates gradients in fp32 over the microbatches before one fp32
# reduce-scatter (section 3.3.2: ZeRO-1 traffic here); interleaved schedule (v = 2 assumed: the paper tunes it but
# does not give it). Activation recompute is not stated in any case: the lightest that fits our memory model.
_LLAMA_STAGES = (7,) + (8,) * 14 + (7,)
CASES = (
    Case("Llama 3 405B, 8,192 H100", "Dubey et al. 2024 (arXiv:2407.21783) Table 4", "llama3-405b", "h100",
         Layout(dp_shard=64, tp=8, pp=16, microbatches=32, schedule="interleaved_1f1b", virtual_stages=2, zero=1,
                stage_layers=_LLAMA_STAGES), 8192, "mfu", 0.43),
    Case("Llama 3 405B, 16,384 H100", "Dubey et al. 2024 Table 4", "llama3-405b", "h100",
         Layout(dp_shard=128, tp=8, pp=16, microbatches=16, schedule="interleaved_1f1b", virtual_stages=2, zero=1,
                stage_layers=_LLAMA_STAGES), 8192, "mfu", 0.41),
    Case("Llama 3 405B, 16,384 H100, 128k context", "Dubey et al. 2024 Table 4", "llama3-405b", "h100",
         Layout(dp_shard=8, tp=8, pp=16, cp=16, microbatches=16, schedule="interleaved_1f1b", virtual_stages=2, zero=1,
                stage_layers=_LLAMA_STAGES), 131072, "mfu", 0.38),
    # DeepSeek-V3: section 3.2-3.3 (PP 16, EP 64 over 8 nodes, ZeRO-1 DP, no TP, DualPipe, fp8 GEMMs, 20 SMs for
    # communication), section 4.2 (4K sequences, batch 15,360 sequences); 2.664M H800 hours for 14.8T tokens
    # (Table 1) = 1,543 tokens per GPU-second. One sequence per microbatch assumed.
    Case("DeepSeek-V3 671B MoE, 2,048 H800", "DeepSeek-AI 2024 (arXiv:2412.19437) Table 1, sections 3.2-3.3, 4.2",
         "deepseek-v3", "h800",
         Layout(dp_shard=128, pp=16, ep=64, microbatches=120, schedule="dualpipe", zero=1, precision="fp8"),
         4096, "tokens_per_gpu_s", 14.8e12 / (2.664e6 * 3600)),
)


def workload(case: Case) -> Workload:
    from gigafactory.plan.describe import read_model_toml

    return read_model_toml(str(MODELS / f"{case.model}.toml"))[1]


def price(case: Case) -> tuple[StepEstimate, float]:
    """(the estimate, the predicted value of the case's metric, MFU with full attention FLOPs where it is MFU)."""
    w = workload(case)
    node = 8
    n = -(-case.layout.world // node) * node
    cluster = make_cluster(case.gpu, n)
    for ckpt in CHECKPOINTING:  # none, selective, full: the lightest that fits
        est = estimate(w, dataclasses.replace(case.layout, checkpointing=ckpt), cluster, MODERN, case.seq_len)
        if est.fits:
            break
    value = est.mfu if case.metric == "mfu" else est.tokens_per_s / case.layout.world
    return est, value
