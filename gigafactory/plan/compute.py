"""Compute time of one layer for one microbatch on one GPU: GEMMs by shape, attention, memory-bound ops.

GEMM efficiency is not a constant: a GEMM of m x n x k runs in 128x128 output tiles spread over the SMs, so it
pays for padding to whole tiles and for the last partial wave, and it is bounded below by the time to move its
operands through HBM (roofline). On top sits one calibrated fraction of peak per GPU (`matmul_efficiency`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from gigafactory.plan.hardware import GPU
from gigafactory.plan.layout import Software
from gigafactory.plan.workload import Workload

TILE = 128  # output tile edge of tensor-core GEMM kernels
K_TILE = 64  # reduction-dimension tile


@lru_cache(maxsize=200_000)
def gemm_time(m: int, n: int, k: int, gpu: GPU, sw: Software, batch: int = 1, fp8: bool = False) -> float:
    """Seconds for `batch` independent (m x k) @ (k x n) GEMMs in bf16, or with fp8 operands at the fp8 peak."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    tm, tn = math.ceil(m / TILE), math.ceil(n / TILE)
    tiles = tm * tn * batch
    waves = math.ceil(tiles / gpu.sms)
    wave_eff = tiles / (waves * gpu.sms)
    pad_eff = (m * n) / (tm * tn * TILE * TILE) * k / (math.ceil(k / K_TILE) * K_TILE)
    flops = 2.0 * m * n * k * batch
    fp8 = fp8 and gpu.fp8_tflops > 0
    peak = gpu.fp8_tflops if fp8 else gpu.bf16_tflops
    t_compute = flops / (peak * 1e12 * gpu.matmul_efficiency * wave_eff * pad_eff)
    operand = 1.0 if fp8 else 2.0  # the bf16 output is written either way
    t_memory = (operand * (m * k + k * n) + 2.0 * m * n) * batch / (gpu.hbm_gbps * 1e9 * sw.hbm_efficiency)
    return max(t_compute, t_memory) + sw.kernel_overhead_us * 1e-6


@dataclass(frozen=True)
class LayerTime:
    """Seconds for one layer, one microbatch, one GPU (communication excluded)."""

    fwd: float  # forward pass
    bwd: float  # backward pass (data and weight gradients)
    wgrad: float  # the weight-gradient part of bwd (what zero-bubble schedules move into the bubble)
    recompute_full: float  # extra forward work under full checkpointing (= fwd)
    recompute_selective: float  # extra work under selective checkpointing (attention core + MLP activation)
    hw_flops_fwd: float  # FLOPs actually executed in the forward (for HFU)
    attn_core_fwd: float  # attention core forward time (what context parallel can overlap with)
    attn_core_bwd: float  # attention core backward time


def _gemm_fwd_bwd(m: int, n: int, k: int, gpu: GPU, sw: Software, batch: int = 1, fp8: bool = False) -> tuple[float, float, float]:
    """(forward, data-gradient, weight-gradient) seconds of one GEMM."""
    fwd = gemm_time(m, n, k, gpu, sw, batch, fp8)
    return fwd, gemm_time(m, k, n, gpu, sw, batch, fp8), gemm_time(n, k, m, gpu, sw, batch, fp8)


def expert_load(w: Workload, sw: Software) -> float:
    """Tokens on the busiest expert / the mean: the capacity factor when buffers are padded to it, else the
    software's measured dropless imbalance."""
    return w.capacity_factor if w.capacity_factor > 0 else sw.moe_imbalance


@lru_cache(maxsize=100_000)
def layer_time(w: Workload, gpu: GPU, sw: Software, tokens: int, seq_kv: int, tp: int, cp: int, ep: int, sp: bool,
               moe: bool = True, fp8: bool = False) -> LayerTime:
    """One layer on `tokens` = microbatch * seq/cp local tokens, keys of length `seq_kv` (the full sequence).

    Tensor-parallel splits every head- and ffn-sized dimension by tp; with sequence parallel (sp) the
    d_model-sized elementwise work is split by tp too. Experts: each GPU holds n_experts/ep experts and
    processes tokens*top_k/n_experts*ep tokens per local expert (times the load imbalance). `moe` False: one of
    the dense leading layers. `fp8`: the layer's projections and MLPs run fp8 GEMMs (DeepSeek-V3's recipe); the
    router, attention core, norms and the output head stay bf16, and every fp8 GEMM pays for quantising its
    inputs (read bf16, write fp8) in the forward and its output gradient in the backward."""
    moe = moe and w.is_moe
    fp8 = fp8 and gpu.fp8_tflops > 0  # no fp8 tensor cores (A100): the GEMMs stay bf16
    fwd = bwd = wgrad = flops = t_cast = 0.0
    hbm = gpu.hbm_gbps * 1e9 * sw.hbm_efficiency
    for group, n, k, mult in w.layer_gemms(moe):
        if group in ("router", "attn_rep"):
            m, n_loc, count = tokens, n, 1
        elif group == "expert":
            local_experts = max(1, w.n_experts // ep)
            m = max(1, round(tokens * w.top_k * ep / w.n_experts * expert_load(w, sw)))
            n_loc, count = n, local_experts
            n_loc = max(1, n // tp) if n != w.d_model else n
            k = k if n != w.d_model else max(1, k // tp)
        else:
            m, count = tokens, 1
            n_loc = max(1, n // tp) if n != w.d_model else n
            k = k if n != w.d_model else max(1, k // tp)
        low = fp8 and group != "router"
        f, bd, bw = _gemm_fwd_bwd(m, n_loc, k, gpu, sw, count, low)
        fwd, bwd, wgrad, flops = fwd + f, bwd + bd + bw, wgrad + bw, flops + 2.0 * m * n_loc * k * count
        if low:
            t_cast += 3.0 * (m * k + m * n_loc) * count / hbm

    heads = max(1, w.n_heads // tp)
    hd = (w.qk_head_dim + w.value_head_dim) / 2  # QK^T runs at the q/k width, PV at the value width
    if sw.attention == "unfused":
        # QK^T and PV as batched GEMMs over (microbatch * heads), plus softmax/mask/dropout passes over s x s.
        micro = max(1, tokens * cp // seq_kv)
        sq = tokens // micro
        f1, b1, w1 = _gemm_fwd_bwd(sq, seq_kv, w.qk_head_dim, gpu, sw, micro * heads)
        f2, b2, w2 = _gemm_fwd_bwd(sq, w.value_head_dim, seq_kv, gpu, sw, micro * heads)
        b1, b2 = b1 + w1, b2 + w2
        probs = tokens * heads * seq_kv  # elements of the s x s tensors on this GPU
        passes_fwd = 2 + (2.5 if w.dropout else 0.0)  # scale-mask-softmax read+write; dropout read, write, mask
        t_soft = probs * 2 * passes_fwd / (gpu.hbm_gbps * 1e9 * sw.hbm_efficiency)
        attn_f, attn_b = f1 + f2 + t_soft, b1 + b2 + 2 * t_soft
        flops += 4.0 * tokens * heads * hd * seq_kv
    else:
        # Fused causal attention: half of the s x s block is skipped.
        core = 4.0 * tokens * heads * hd * seq_kv * 0.5
        attn_f = core / (gpu.bf16_tflops * 1e12 * sw.flash_fwd_efficiency)
        attn_b = 2.5 * core / (gpu.bf16_tflops * 1e12 * sw.flash_bwd_efficiency)
        flops += core

    # Memory-bound elementwise work, in elements per token (bf16), forward; backward moves about twice as much.
    d, shard_d = w.d_model, (tp if sp else 1)
    act = mlp_activation_elems(w, sw, tp, moe)
    resid = 2 * (3.5 if w.dropout else 3.0) * d / shard_d
    norms = w.norms_per_layer * 2 * d / shard_d
    rope = 2 * (w.q_width + w.kv_width) / tp if w.rope else 0.0
    permute = 4 * w.top_k * d / shard_d if moe else 0.0  # dispatch permute + combine un-permute
    elems = act + resid + norms + rope + permute
    t_elem = tokens * elems * 2 / hbm
    t_act = tokens * act * 2 / hbm

    fwd_total = fwd + attn_f + t_elem + t_cast
    return LayerTime(
        fwd=fwd_total, bwd=bwd + attn_b + 2 * t_elem + t_cast, wgrad=wgrad, recompute_full=fwd_total,
        recompute_selective=(attn_f if sw.attention == "unfused" else 0.0) + t_act,
        hw_flops_fwd=flops, attn_core_fwd=attn_f, attn_core_bwd=attn_b,
    )


def mlp_activation_elems(w: Workload, sw: Software, tp: int, moe: bool) -> float:
    """Elements per token the MLP activation function reads and writes (gate, up, product)."""
    width = 3 if w.gated else 2
    if moe:
        shared = w.ffn_dim * w.n_shared_experts
        routed = w.ffn_dim * w.top_k * expert_load(w, sw)
        return width * (routed + shared) / tp + (3 * w.dense_ffn_dim / tp if w.dense_ffn_dim else 0)
    fd = (w.dense_layer_ffn_dim or w.ffn_dim * w.top_k) if w.is_moe else w.ffn_dim
    return width * fd / tp + (3 * w.dense_ffn_dim / tp if w.dense_ffn_dim else 0)


@lru_cache(maxsize=10_000)
def head_time(w: Workload, gpu: GPU, sw: Software, tokens: int, tp: int) -> tuple[float, float, float]:
    """(forward, backward, FLOPs) of the output projection and the loss on the last pipeline stage."""
    v = max(1, w.vocab // tp)
    f, bd, bw = _gemm_fwd_bwd(tokens, v, w.d_model, gpu, sw)
    b = bd + bw
    t_loss = 3 * tokens * v * 4 / (gpu.hbm_gbps * 1e9 * sw.hbm_efficiency)  # fp32 softmax/cross-entropy passes
    return f + t_loss, b + t_loss, 2.0 * tokens * v * w.d_model
