"""One training step of one layout on one cluster: time, FLOP rates and memory.

step = m * t_stage_max + bubble * t_stage_avg + exposed gradient sync + optimizer, where a stage's time per
microbatch is its layers' compute (forward, backward, recompute) plus the exposed part of every collective the
layout issues (tensor, expert, context, FSDP), plus pipeline sends. docs/plan.md states each term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gigafactory.plan import comm
from gigafactory.plan.compute import head_time, layer_time
from gigafactory.plan.hardware import Cluster
from gigafactory.plan.layout import Layout, Software
from gigafactory.plan.memory import Memory, estimate_memory, local_params
from gigafactory.plan.workload import Workload

BUBBLE = {"gpipe": 1.0, "1f1b": 1.0, "interleaved_1f1b": 1.0, "zero_bubble": 1.0 / 3.0}  # x (p-1)/v stage times


@dataclass(frozen=True)
class StepEstimate:
    """The cost model's verdict on one layout."""

    layout: Layout
    step_time_s: float
    tokens_per_step: int
    mfu: float  # model FLOPs (no recompute) / (time * GPUs * peak)
    hfu: float  # executed FLOPs (with recompute) / (time * GPUs * peak)
    tflops_per_gpu: float  # executed TFLOP/s per GPU (Megatron's convention, recompute counted)
    memory: Memory
    fits: bool
    breakdown: dict = field(default_factory=dict)  # seconds per step spent in each term

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s


def estimate(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int) -> StepEstimate:
    gpu = cluster.gpu
    tokens = lay.microbatch_size * seq_len // lay.cp  # local tokens of one microbatch
    lt = layer_time(w, gpu, sw, tokens, seq_len, lay.tp, lay.cp, lay.ep, lay.sequence_parallel)
    full = lay.checkpointing == "full"
    recompute = lt.recompute_full if full else lt.recompute_selective if lay.checkpointing == "selective" else 0.0

    act_bytes = tokens * w.d_model * 2
    t_tp = (4 + (2 if full else 0)) * comm.all_reduce(act_bytes, lay.tp, 1, cluster)
    t_ep = 0.0
    if w.is_moe and lay.ep > 1:
        sent = tokens / (lay.tp if lay.sequence_parallel else 1) * w.top_k * w.d_model * 2 * sw.moe_imbalance
        t_ep = (4 + (2 if full else 0)) * comm.all_to_all(sent, lay.ep, lay.tp, cluster)
    # Context-parallel K/V ring sends and FSDP gathers/reduce-scatters are prefetched behind the layer's compute;
    # they share that one window, and only what exceeds it is exposed.
    ring = 0.0
    if lay.cp > 1:
        kv = tokens * 2 * w.kv_width / lay.tp * 2
        ring = (lay.cp - 1) * comm.p2p(kv, lay.tp, cluster) * (3 + (1 if full else 0))
    fsdp = 0.0
    _, _, per_layer = local_params(w, lay)
    if lay.dp_shard > 1:
        dense_layer = per_layer if not w.is_moe else w.params_layer_dense / lay.tp
        expert_layer = per_layer - dense_layer
        g_dense, g_exp = lay.dp_shard * lay.cp, max(1, lay.dp_shard * lay.cp // lay.ep)

        def gather(nbytes_per_param: float) -> float:
            return (comm.all_gather(dense_layer * nbytes_per_param, g_dense, lay.tp, cluster)
                    + comm.all_gather(expert_layer * nbytes_per_param, g_exp, lay.tp * lay.ep, cluster))

        fsdp = 2 * gather(2) + gather(sw.grad_bytes)  # all-gather in forward and backward, reduce-scatter
    compute = lt.fwd + lt.bwd + recompute
    hidden_exposed = max(0.0, ring + fsdp - compute)
    t_cp = hidden_exposed * ring / (ring + fsdp) if ring + fsdp else 0.0
    t_fsdp = hidden_exposed - t_cp
    per_layer_time = compute + t_tp * (1 - sw.tp_overlap) + t_ep * (1 - sw.ep_overlap) + hidden_exposed
    bwd_wall = lt.bwd + recompute + hidden_exposed  # the backward of one layer as the clock sees it

    layers = w.n_layers // lay.pp
    head_f, head_b, _ = head_time(w, gpu, sw, tokens, lay.tp)
    v = lay.virtual_stages if lay.schedule == "interleaved_1f1b" else 1
    p2p = 0.0
    if lay.pp > 1:
        pp_stride = lay.tp * lay.cp * lay.dp
        p2p = 2 * v * comm.p2p(act_bytes / lay.tp, pp_stride, cluster)
    body = layers * per_layer_time + p2p
    stage_max = body + head_f + head_b
    stage_avg = body + (head_f + head_b) / lay.pp
    m = lay.microbatches
    bubble = (lay.pp - 1) / v * BUBBLE[lay.schedule] * stage_avg if lay.pp > 1 else 0.0
    pipeline = m * stage_max + bubble

    dense, expert, _ = local_params(w, lay)
    if lay.dp_shard > 1:  # HSDP: the shards' gradients are all-reduced across replicas once per step
        t_dp = comm.all_reduce((dense / (lay.dp_shard * lay.cp) + expert / max(1, lay.dp_shard * lay.cp // lay.ep)) * sw.grad_bytes,
                               lay.dp_replicate, lay.tp * lay.cp * lay.dp_shard, cluster)
        state_params = dense / (lay.dp_shard * lay.cp) + expert / max(1, lay.dp_shard * lay.cp // lay.ep)
    else:
        t_dp = comm.all_reduce(dense * sw.grad_bytes, lay.dp_replicate * lay.cp, lay.tp, cluster)
        t_dp += comm.all_reduce(expert * sw.grad_bytes, max(1, lay.dp_replicate * lay.cp // lay.ep), lay.tp * lay.ep, cluster)
        state_params = dense + expert
    window = layers * bwd_wall if sw.dp_overlap else 0.0
    dp_exposed = max(0.0, t_dp - window)
    optimizer = 30.0 * state_params / (gpu.hbm_gbps * 1e9 * sw.hbm_efficiency)  # Adam: read/write p, g, m, v
    step = pipeline + dp_exposed + optimizer

    tokens_per_step = lay.global_batch * seq_len
    model_flops = w.model_flops_per_token(seq_len) * tokens_per_step
    layer_fwd_flops = w.forward_matmul_flops_per_token() - 2 * w.vocab * w.d_model + w.attention_flops_per_token(seq_len)
    extra = layer_fwd_flops if full else (w.attention_flops_per_token(seq_len) if lay.checkpointing == "selective" and sw.attention == "unfused" else 0.0)
    hw_flops = model_flops + extra * tokens_per_step
    peak = lay.world * gpu.bf16_tflops * 1e12
    mem = estimate_memory(w, lay, sw, seq_len)
    breakdown = {
        "compute": m * layers * (lt.fwd + lt.bwd) + m * (head_f + head_b), "recompute": m * layers * recompute,
        "tp_comm": m * layers * t_tp * (1 - sw.tp_overlap), "ep_comm": m * layers * t_ep * (1 - sw.ep_overlap),
        "cp_comm": m * layers * t_cp, "fsdp_comm": m * layers * t_fsdp, "pp_p2p": m * p2p, "pp_bubble": bubble,
        "dp_comm": dp_exposed, "optimizer": optimizer,
    }
    return StepEstimate(
        layout=lay, step_time_s=step, tokens_per_step=tokens_per_step, mfu=model_flops / (step * peak),
        hfu=hw_flops / (step * peak), tflops_per_gpu=hw_flops / step / lay.world / 1e12, memory=mem,
        fits=mem.total <= gpu.hbm_gb * 1e9, breakdown=breakdown,
    )
