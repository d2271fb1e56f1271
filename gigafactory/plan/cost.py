"""One training step of one layout on one cluster: time, FLOP rates, memory and the phases a power model needs.

Per layer and microbatch: compute (compute.py) plus the exposed part of its collectives: tensor parallel (a fixed
hidden fraction, async TP), expert all-to-all (hidden behind the shared expert's compute, and under DualPipe
behind the other direction's microbatch, with SMs given to communication), and the context-parallel ring and
ZeRO-3 gathers / ZeRO-2 reduce-scatters prefetched into the layer's compute window. Stages add pipeline sends
and the head; pipeline.py turns stage times into the step's pipeline time; the gradient sync of DDP / ZeRO-1 /
HSDP and ZeRO-1/2's weight all-gather are exposed only beyond the backward / forward window they overlap.
docs/plan.md states each term.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from gigafactory.plan import comm
from gigafactory.plan.compute import expert_load, head_time, layer_time
from gigafactory.plan.hardware import Cluster
from gigafactory.plan.layout import Layout, Software
from gigafactory.plan.memory import Memory, estimate_memory, shard_groups, stage_params, stage_split
from gigafactory.plan.pipeline import StageTimes, balanced_stages, pipeline_time
from gigafactory.plan.workload import Workload


@dataclass(frozen=True)
class StepEstimate:
    """The cost model's verdict on one layout."""

    layout: Layout
    step_time_s: float
    tokens_per_step: int
    mfu: float  # model FLOPs (full attention, no recompute) / (time * GPUs * bf16 peak)
    hfu: float  # executed FLOPs (with recompute) / (time * GPUs * bf16 peak)
    tflops_per_gpu: float  # executed TFLOP/s per GPU (Megatron's convention, recompute counted)
    memory: Memory
    fits: bool
    breakdown: dict = field(default_factory=dict)  # seconds per step spent in each term
    mfu_causal: float = 0.0  # model FLOPs with causal-halved attention (Llama 3's convention) / same denominator
    stage_layers: tuple = ()  # layers per pipeline stage as priced
    phases: dict = field(default_factory=dict)  # seconds of one step an average GPU spends computing, waiting, idle

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s


PARTS = ("compute", "free_fwd", "free_bwd", "recompute", "tp", "ep", "cp", "zero")  # LayerCost fields summed per stage


@dataclass(frozen=True)
class LayerCost:
    fwd: float  # wall seconds of one layer's forward for one microbatch (exposed communication included)
    bwd: float
    wgrad: float
    compute: float  # of fwd + bwd: kernels only (recompute included)
    free_fwd: float  # forward kernel time not already overlapping the layer's own ring / ZeRO traffic
    free_bwd: float  # the same in the backward: the window once-per-step gathers / reductions can hide in
    recompute: float
    tp: float  # exposed seconds per kind of communication
    ep: float
    cp: float
    zero: float


def layer_cost(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int, moe: bool, *,
               zero: int | None = None, checkpointing: str | None = None, dualpipe: bool | None = None) -> LayerCost:
    """One layer's cost under `lay` (or it with another ZeRO stage, checkpointing or DualPipe pairing); cached on
    the few layout fields it depends on (the search prices thousands)."""
    zero = lay.zero if zero is None else zero
    zero = zero if lay.dp_shard > 1 and zero >= 2 else 0  # ZeRO-0/1 add no per-layer traffic
    dualpipe = lay.schedule == "dualpipe" if dualpipe is None else dualpipe
    return _layer_cost_cached(w, cluster, sw, seq_len, moe, lay.tp, lay.cp, lay.ep, lay.microbatch_size,
                              lay.sequence_parallel, checkpointing or lay.checkpointing, lay.precision, dualpipe,
                              zero, lay.dp_shard if zero else 1, lay.reduce_dtype)


@lru_cache(maxsize=50_000)
def _layer_cost_cached(w: Workload, cluster: Cluster, sw: Software, seq_len: int, moe: bool, tp: int, cp: int, ep: int,
                       mbs: int, sp: bool, ckpt: str, precision: str, dualpipe: bool, zero: int, dp_shard: int,
                       reduce_dtype: str) -> LayerCost:
    lay = Layout(dp_shard=dp_shard, tp=tp, cp=cp, ep=ep, microbatch_size=mbs, sequence_parallel=sp, checkpointing=ckpt,
                 precision=precision, schedule="dualpipe" if dualpipe else "1f1b", zero=zero, reduce_dtype=reduce_dtype)
    return _layer_cost(w, lay, cluster, sw, seq_len, moe)


def _layer_cost(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int, moe: bool) -> LayerCost:
    gpu = cluster.gpu
    tokens = lay.microbatch_size * seq_len // lay.cp
    fp8 = lay.precision == "fp8"
    lt = layer_time(w, gpu, sw, tokens, seq_len, lay.tp, lay.cp, lay.ep, lay.sequence_parallel, moe, fp8)
    full = lay.checkpointing == "full"
    recompute = lt.recompute_full if full else lt.recompute_selective if lay.checkpointing == "selective" else 0.0
    fwd_c, bwd_c = lt.fwd, lt.bwd + recompute
    moe = moe and w.is_moe

    act_bytes = tokens * w.d_model * 2
    t_tp = comm.all_reduce(act_bytes, lay.tp, 1, cluster) * (1 - sw.tp_overlap)
    tp_f, tp_b = 2 * t_tp, (2 + (2 if full else 0)) * t_tp

    # Expert all-to-all: what cannot overlap anything stays on the critical path; the rest joins the pool of
    # traffic hidden behind the layer's compute. Without DualPipe only the shared expert's compute runs while the
    # routed tokens are in flight; under DualPipe a forward and a backward chunk of different microbatches run
    # together and the pair's all-to-alls hide behind the pair's compute (DeepSeek-V3 Figure 4), which loses the
    # SMs given to communication.
    ep_f = ep_b = ep_hideable = 0.0
    if moe and lay.ep > 1:
        local = tokens / (lay.tp if lay.sequence_parallel else 1) * w.d_model * expert_load(w, sw)
        a2a = lambda nbytes: comm.moe_all_to_all(local * nbytes, w.top_k, lay.ep, lay.tp, cluster, w.node_limit)  # noqa: E731
        dispatch, combine = a2a(1 if fp8 else 2), a2a(2)
        ep_f, ep_b = dispatch + combine, 2 * a2a(2) + (dispatch + combine if full else 0.0)
        if lay.schedule == "dualpipe":
            slow = gpu.sms / max(1, gpu.sms - sw.comm_sms)
            fwd_c, bwd_c = fwd_c * slow, bwd_c * slow
            ep_hideable = ep_f + ep_b
        elif w.n_shared_experts:
            # the shared expert's part of the MLP work, the MLP taken as half the layer's compute
            shared = w.n_shared_experts / (w.n_shared_experts + w.top_k) * 0.5 * (lt.fwd + lt.bwd)
            ep_hideable = min(ep_f + ep_b, shared)
    ep_fixed = ep_f + ep_b - ep_hideable
    f_share = fwd_c / (fwd_c + bwd_c)
    ep_f_fixed, ep_b_fixed = (ep_fixed * ep_f / (ep_f + ep_b), ep_fixed * ep_b / (ep_f + ep_b)) if ep_f + ep_b else (0.0, 0.0)

    ring = 0.0
    if lay.cp > 1:
        kv = tokens * 2 * w.kv_width / lay.tp * 2
        ring = (lay.cp - 1) * comm.p2p(kv, lay.tp, cluster) * (3 + (1 if full else 0))
    zero = 0.0
    if lay.sharded and lay.zero >= 2:
        dense, experts = w.layer_params(moe)
        dense /= lay.tp
        experts /= lay.tp * lay.ep
        g_dense, g_exp = shard_groups(lay)
        red = 4 if lay.reduce_dtype == "fp32" else 2

        def collective(nbytes: float, experts_too: float) -> float:
            return (comm.all_gather(dense * nbytes, g_dense, lay.tp, cluster)
                    + comm.all_gather(experts * experts_too, g_exp, lay.tp * lay.ep, cluster))

        zero = collective(red, red)  # gradients reduce-scattered per microbatch
        if lay.zero == 3:
            zero += 2 * collective(2, 2)  # bf16 weights gathered in the forward and again in the backward
    # The ring, ZeRO traffic and the hideable all-to-all share one window, the layer's compute: only the excess shows.
    compute = fwd_c + bwd_c
    pool = ring + zero + ep_hideable
    exposed = max(0.0, pool - compute)
    t_cp, t_zero, t_ep = ((exposed * x / pool) for x in (ring, zero, ep_hideable)) if pool else (0.0, 0.0, 0.0)
    free = max(0.0, compute - pool)
    return LayerCost(
        fwd=fwd_c + tp_f + ep_f_fixed + exposed * f_share, bwd=bwd_c + tp_b + ep_b_fixed + exposed * (1 - f_share),
        wgrad=lt.wgrad, compute=compute, free_fwd=f_share * free, free_bwd=(1 - f_share) * free, recompute=recompute,
        tp=tp_f + tp_b, ep=ep_fixed + t_ep, cp=t_cp, zero=t_zero,
    )


def paired_fraction(lay: Layout) -> float:
    """Share of DualPipe's chunks that run as a forward-backward pair (its steady phase): the warm-up and cool-down
    chunks, about pp of the m microbatches, run alone and hide nothing."""
    if lay.schedule != "dualpipe" or lay.pp < 2:
        return 0.0
    return max(0.0, lay.microbatches - lay.pp) / lay.microbatches


def paired_cost(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int, moe: bool, *,
                zero: int | None = None, checkpointing: str | None = None) -> LayerCost:
    """A layer's cost under DualPipe: paired chunks' (all-to-all hidden, SMs lost) mixed with unpaired chunks'."""
    f = paired_fraction(lay)
    kw = dict(zero=zero, checkpointing=checkpointing)
    if lay.schedule != "dualpipe" or f == 1.0:
        return layer_cost(w, lay, cluster, sw, seq_len, moe, **kw)
    alone = layer_cost(w, lay, cluster, sw, seq_len, moe, dualpipe=False, **kw)
    if f == 0.0:
        return alone
    paired = layer_cost(w, lay, cluster, sw, seq_len, moe, **kw)
    return LayerCost(*(f * a + (1 - f) * b for a, b in zip(vars(paired).values(), vars(alone).values())))


def estimate(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int) -> StepEstimate:
    gpu = cluster.gpu
    tokens = lay.microbatch_size * seq_len // lay.cp
    moe_cost = paired_cost(w, lay, cluster, sw, seq_len, True)
    dense_cost = paired_cost(w, lay, cluster, sw, seq_len, False) if w.n_moe_layers < w.n_layers else moe_cost
    head_f, head_b, _ = head_time(w, gpu, sw, tokens, lay.tp)
    v = lay.virtual_stages if lay.schedule == "interleaved_1f1b" else 1
    p2p = comm.p2p(tokens * w.d_model * 2 / lay.tp, lay.tp * lay.cp * lay.dp, cluster) * v if lay.pp > 1 else 0.0
    layers = lay.stage_layers or balanced_stages(w.n_layers, lay.pp, moe_cost.fwd + moe_cost.bwd, head_f + head_b)

    # stages holding the same layers cost the same: price each kind once
    kinds = [(*stage_split(w, layers, s), s == lay.pp - 1) for s in range(lay.pp)]
    priced: dict = {}
    for kind in set(kinds):
        n_dense, n_moe, last = kind
        head = (head_f, head_b) if last else (0.0, 0.0)
        part = {k: n_dense * getattr(dense_cost, k) + n_moe * getattr(moe_cost, k) for k in PARTS}
        part["free_fwd"] += head[0]
        part["free_bwd"] += head[1]
        part["compute"] += head[0] + head[1]
        part["pp_p2p"] = 2 * p2p
        times = (n_dense * dense_cost.fwd + n_moe * moe_cost.fwd + p2p + head[0],
                 n_dense * dense_cost.bwd + n_moe * moe_cost.bwd + p2p + head[1],
                 n_dense * dense_cost.wgrad + n_moe * moe_cost.wgrad)
        priced[kind] = (times, part)
    fwd, bwd, wgrad = zip(*(priced[k][0] for k in kinds))
    parts = [priced[k][1] for k in kinds]
    stages = StageTimes(fwd, bwd, wgrad)
    m = lay.microbatches
    pipeline = pipeline_time(lay, stages)
    slowest = stages.slowest()

    # Once per step: gradient sync (DDP all-reduce, ZeRO-1 reduce-scatter, HSDP's cross-replica all-reduce) behind
    # the last microbatch's backward; ZeRO-1/2 gather the updated bf16 weights behind the first forward.
    dense, expert, _ = stage_params(w, lay, layers, slowest)
    g_dense, g_exp = shard_groups(lay)
    red = 4 if lay.reduce_dtype == "fp32" else 2
    t_dp = t_gather = 0.0
    if not lay.sharded:
        t_dp = (comm.all_reduce(dense * red, lay.dp * lay.cp, lay.tp, cluster)
                + comm.all_reduce(expert * red, max(1, lay.dp * lay.cp // lay.ep), lay.tp * lay.ep, cluster))
    else:
        if lay.zero == 1:
            t_dp = (comm.reduce_scatter(dense * red, g_dense, lay.tp, cluster)
                    + comm.reduce_scatter(expert * red, g_exp, lay.tp * lay.ep, cluster))
        if lay.zero in (1, 2):
            t_gather = (comm.all_gather(dense * 2, g_dense, lay.tp, cluster)
                        + comm.all_gather(expert * 2, g_exp, lay.tp * lay.ep, cluster))
        if lay.dp_replicate > 1:
            t_dp += comm.all_reduce((dense / g_dense + expert / g_exp) * red, lay.dp_replicate,
                                    lay.tp * lay.cp * lay.dp_shard, cluster)
    # the windows are kernel time the layers' own ring / ZeRO traffic leaves free on the links
    fwd_window, bwd_window = parts[slowest]["free_fwd"], parts[slowest]["free_bwd"]
    dp_exposed = max(0.0, t_dp - (bwd_window if sw.dp_overlap else 0.0))
    gather_exposed = max(0.0, t_gather - (fwd_window if sw.dp_overlap else 0.0))
    state_params = dense / g_dense + expert / g_exp
    optimizer = 30.0 * state_params / (gpu.hbm_gbps * 1e9 * sw.hbm_efficiency)  # Adam: read/write p, g, m, v
    step = pipeline + dp_exposed + gather_exposed + optimizer

    tokens_per_step = lay.global_batch * seq_len
    model_flops = w.model_flops_per_token(seq_len) * tokens_per_step
    causal_flops = w.model_flops_per_token(seq_len, causal=True) * tokens_per_step
    layer_fwd_flops = w.forward_matmul_flops_per_token() - 2 * w.vocab * w.d_model + w.attention_flops_per_token(seq_len)
    full = lay.checkpointing == "full"
    extra = layer_fwd_flops if full else (w.attention_flops_per_token(seq_len) if lay.checkpointing == "selective" and sw.attention == "unfused" else 0.0)
    hw_flops = model_flops + extra * tokens_per_step
    peak = lay.world * gpu.bf16_tflops * 1e12
    mem = estimate_memory(w, lay, sw, seq_len, layers)
    slow = parts[slowest]
    breakdown = {
        "compute": m * (slow["compute"] - slow["recompute"]), "recompute": m * slow["recompute"],
        "tp_comm": m * slow["tp"], "ep_comm": m * slow["ep"], "cp_comm": m * slow["cp"], "zero_comm": m * slow["zero"],
        "pp_p2p": m * slow["pp_p2p"], "pp_bubble": pipeline - m * stages.total[slowest],
        "dp_comm": dp_exposed, "weight_gather": gather_exposed, "optimizer": optimizer,
    }
    avg = {k: sum(priced[kind][1][k] * kinds.count(kind) for kind in priced) / lay.pp for k in ("compute", *PARTS[4:], "pp_p2p")}
    busy = m * avg["compute"]
    waiting = m * (avg["tp"] + avg["ep"] + avg["cp"] + avg["zero"] + avg["pp_p2p"]) + dp_exposed + gather_exposed
    phases = {"compute": busy, "communication": waiting, "optimizer": optimizer,
              "idle": max(0.0, step - busy - waiting - optimizer)}
    return StepEstimate(
        layout=lay, step_time_s=step, tokens_per_step=tokens_per_step, mfu=model_flops / (step * peak),
        hfu=hw_flops / (step * peak), tflops_per_gpu=hw_flops / step / lay.world / 1e12, memory=mem,
        fits=mem.total <= gpu.hbm_gb * 1e9, breakdown=breakdown, mfu_causal=causal_flops / (step * peak),
        stage_layers=tuple(layers), phases=phases,
    )
