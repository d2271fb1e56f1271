"""Search the layouts of one cluster for the fastest one that fits, by branch and bound.

Candidates (tp, cp, ep, microbatch) are visited in order of a lower bound on time per token (their layer
compute with no communication, bubble or recompute); a candidate whose bound is already slower than the best
layout found is skipped with everything under it. For each survivor: pipeline degrees (dividing the layers, or
powers of two with uneven stages), data-parallel sizes that leave at most `max_idle` of the GPUs as spares, DDP
or ZeRO-1/2/3 (HSDP when replicated too), schedules, and the cheapest activation checkpointing that fits (none,
then selective, then full: recompute only adds time). GPipe and plain 1F1B are not searched: zero-bubble has
their memory and a bubble never larger in this model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError
from gigafactory.plan.compute import head_time, layer_time
from gigafactory.plan.cost import StepEstimate, paired_cost, estimate, layer_cost
from gigafactory.plan.hardware import Cluster
from gigafactory.plan.layout import CHECKPOINTING, Layout, Software
from gigafactory.plan.memory import memory_grid
from gigafactory.plan.workload import Workload


@dataclass(frozen=True)
class SearchSpace:
    """Limits of the layout search."""

    global_batch: int = knob(2048, "Target sequences per optimizer step.")
    batch_slack: float = knob(0.25, "Accept a global batch within this fraction of the target (dp sizes rarely divide it).")
    max_idle: float = knob(0.05, "Fraction of the GPUs the layout may leave idle (spares) to get a good factorisation.")
    max_tp: int = knob(8, "Largest tensor-parallel degree (never beyond the NVLink domain).")
    max_cp: int = knob(8, "Largest context-parallel degree.")
    max_microbatch: int = knob(16, "Largest microbatch size.")
    max_microbatch_tokens: int = knob(65536, "Largest local tokens per microbatch.")
    sequence_parallel: bool = knob(True, "Use sequence parallelism with tp (Megatron-SC21 runs: false).")
    keep: int = knob(10, "How many of the best layouts to return.")
    dp_sizes: int = knob(1, "Data-parallel sizes tried per model-parallel shape, largest (fewest spares) first.")
    precision: str = knob("bf16", "GEMM precision of every layout searched ('bf16' or 'fp8').")
    reduce_dtype: str = knob("fp32", "Gradient reduction dtype of every layout searched.")


def _pow2_upto(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(1, limit))) + 1)]


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _dp_candidates(n: int, model: int, node: int, min_used: int) -> list[int]:
    """Data-parallel sizes dp (GPUs used = dp * model) with spares <= max_idle and whole nodes used."""
    dp_max = n // model
    out = set()
    for q in _pow2_upto(1024) + [3, 5, 6, 10, 12, 24, 48, 96]:
        dp = dp_max - dp_max % q
        while dp > 0 and (dp * model) % node:
            dp -= q
        if dp > 0 and dp * model >= min_used:
            out.add(dp)
    return sorted(out, reverse=True)


def _shard_options(dp: int, cp: int, ep: int) -> list[int]:
    opts = {d for d in _pow2_upto(dp) if dp % d == 0} | {dp}
    return sorted(d for d in opts if (d * cp) % ep == 0)


def _model_compute(w: Workload, cluster: Cluster, sw: Software, tokens: int, seq_len: int, tp: int, cp: int, ep: int,
                   mbs: int, space: SearchSpace) -> tuple[float, float]:
    """(seconds of every layer and the head for one microbatch, their weight-gradient part), a lower bound for any
    layout with these tp, cp, ep and microbatch: kernels plus the tensor- and expert-parallel exposure that no data
    or pipeline choice removes (the smaller of the plain and the DualPipe-overlapped all-to-all)."""
    def cheapest(moe: bool):
        lay = Layout(tp=tp, cp=cp, ep=ep, microbatch_size=mbs, sequence_parallel=space.sequence_parallel,
                     precision=space.precision)
        costs = [layer_cost(w, lay, cluster, sw, seq_len, moe, dualpipe=d) for d in (False, True)]
        return min(costs, key=lambda c: c.fwd + c.bwd - c.cp - c.zero)

    moe, dense = cheapest(True), cheapest(False)
    n_dense = w.n_layers - w.n_moe_layers
    hf, hb, _ = head_time(w, cluster.gpu, sw, tokens, tp)
    layer = lambda c: c.fwd + c.bwd - c.cp - c.zero  # noqa: E731
    total = w.n_moe_layers * layer(moe) + n_dense * layer(dense) + hf + hb
    return total, w.n_moe_layers * moe.wgrad + n_dense * dense.wgrad


def _recompute(w: Workload, cluster: Cluster, sw: Software, tokens: int, seq_len: int, tp: int, cp: int, ep: int,
               space: SearchSpace) -> dict[str, float]:
    """Seconds of recompute per microbatch over all layers, per checkpointing choice."""
    fp8 = space.precision == "fp8"
    out = {"none": 0.0, "selective": 0.0, "full": 0.0}
    for moe, count in ((True, w.n_moe_layers), (False, w.n_layers - w.n_moe_layers)):
        if count:
            lt = layer_time(w, cluster.gpu, sw, tokens, seq_len, tp, cp, ep, space.sequence_parallel, moe, fp8)
            out["selective"] += count * lt.recompute_selective
            out["full"] += count * lt.recompute_full
    return out


def _layout_bound(w: Workload, lay: Layout, cluster: Cluster, sw: Software, seq_len: int, head_s: float, zero: int,
                  checkpointing: str) -> float:
    """A lower bound on the step of `lay` with this ZeRO stage and checkpointing: its layers as priced (exposed
    traffic included), spread evenly over the stages, through the schedule; no once-per-step sync or imbalance."""
    kw = dict(zero=zero, checkpointing=checkpointing)
    moe = paired_cost(w, lay, cluster, sw, seq_len, True, **kw)
    dense = paired_cost(w, lay, cluster, sw, seq_len, False, **kw) if w.n_moe_layers < w.n_layers else moe
    n_dense = w.n_layers - w.n_moe_layers
    total = w.n_moe_layers * (moe.fwd + moe.bwd) + n_dense * (dense.fwd + dense.bwd) + head_s
    wgrad = w.n_moe_layers * moe.wgrad + n_dense * dense.wgrad
    v = lay.virtual_stages if lay.schedule == "interleaved_1f1b" else 1
    return _pipeline_bound(total / lay.pp, wgrad / lay.pp, lay.pp, lay.microbatches, lay.schedule, v)


def _pipeline_bound(t: float, wgrad: float, p: int, m: int, schedule: str, v: int) -> float:
    """A lower bound on pipeline.pipeline_time when every stage takes exactly its share t of the compute."""
    if p == 1:
        return m * t
    if schedule == "interleaved_1f1b":
        return m * t + (p - 1) * t / v
    if schedule == "dualpipe":  # F + 2B - 3W >= 2t - 3W with F + B = t, B >= t/2 ... bounded by 0 to stay safe
        return m * t
    moved = (p - 1) * wgrad * (1 + min(1.0, (m - 1) / (p - 1)))
    return m * t + max(0.0, (p - 1) * t - moved)


def search(w: Workload, cluster: Cluster, sw: Software, seq_len: int, space: SearchSpace) -> tuple[list[StepEstimate], int]:
    """(best fitting layouts, fastest first by time per token; number of layouts priced)."""
    n, gpu = cluster.n_gpus, cluster.gpu
    min_used = math.ceil(n * (1 - space.max_idle))
    tps = [t for t in _pow2_upto(min(space.max_tp, gpu.nvlink_domain, n))
           if w.n_heads % t == 0 and w.ffn_dim % t == 0 and (w.n_kv_heads % t == 0 or t % w.n_kv_heads == 0)]
    cps = [c for c in _pow2_upto(min(space.max_cp, n)) if seq_len % (2 * c) == 0 and seq_len // c >= 1024 or c == 1]
    eps = [e for e in _divisors(w.n_experts) if e <= n] if w.is_moe else [1]
    mbss = _pow2_upto(space.max_microbatch)
    candidates = []
    for tp in tps:
        for cp in cps:
            for ep in eps:
                for mbs in mbss:
                    tokens = mbs * seq_len // cp
                    if tokens > space.max_microbatch_tokens and mbs > 1:
                        continue
                    if tp * cp > n:
                        continue
                    model_s, wgrad_s = _model_compute(w, cluster, sw, tokens, seq_len, tp, cp, ep, mbs, space)
                    bound = model_s * tp * cp / (tokens * cp * n)
                    rec = _recompute(w, cluster, sw, tokens, seq_len, tp, cp, ep, space)
                    hf, hb, _ = head_time(w, gpu, sw, tokens, tp)
                    candidates.append((bound, tp, cp, ep, mbs, model_s, wgrad_s, rec, hf + hb))
    candidates.sort()
    results: list[StepEstimate] = []
    best = math.inf
    priced = 0
    smallest_mem = math.inf
    target, slack = space.global_batch, space.batch_slack
    for bound, tp, cp, ep, mbs, model_s, wgrad_s, rec, head_s in candidates:
        if bound >= best:
            break
        for pp in sorted(set(_divisors(w.n_layers, min(w.n_layers, 128))) | set(_pow2_upto(min(w.n_layers // 2, 128)))):
            model = tp * cp * pp
            if model > n:
                break
            even = w.n_layers % pp == 0
            schedules = [("1f1b", 1)] if pp == 1 else [("zero_bubble", 1)] + [
                ("interleaved_1f1b", v) for v in (2, 3, 4) if even and (w.n_layers // pp) % v == 0] + (
                [("dualpipe", 1)] if pp % 2 == 0 else [])
            for dp in _dp_candidates(n, model, gpu.gpus_per_node, min_used)[:space.dp_sizes]:
                if dp * mbs > target * (1 + slack):
                    continue
                for sched, v in schedules:
                    m = max(1, round(target / (dp * mbs)))
                    if sched == "interleaved_1f1b":
                        m = max(pp, round(m / pp) * pp)
                    if sched == "dualpipe":
                        m = max(pp, m + m % 2)
                    if abs(dp * mbs * m - target) > slack * target and dp * mbs * m > target:
                        continue
                    if _pipeline_bound(model_s / pp, wgrad_s / pp, pp, m, sched, v) / (dp * mbs * m * seq_len) >= best:
                        continue  # even with no communication and no recompute it is slower than the best so far
                    fitted_shard = False
                    for shard in _shard_options(dp, cp, ep):
                        if fitted_shard and shard != dp:
                            continue  # past the smallest shard group that fits, only full sharding is tried too
                        # the lightest sharding that fits, then the lightest checkpointing: each step up only adds
                        # traffic (ZeRO-1 -> 2 -> 3) or recompute (none -> selective -> full)
                        base = Layout(dp_replicate=dp // shard, dp_shard=shard, tp=tp, pp=pp, ep=ep, cp=cp,
                                      microbatch_size=mbs, microbatches=m, schedule=sched, virtual_stages=v,
                                      sequence_parallel=space.sequence_parallel, precision=space.precision,
                                      reduce_dtype=space.reduce_dtype)
                        zeros = (1, 2, 3) if shard > 1 else (0,)
                        if _layout_bound(w, base, cluster, sw, seq_len, head_s, zeros[0], "none") / (dp * mbs * m * seq_len) >= best:
                            continue  # even its lightest sharding and no recompute is slower than the best so far
                        grid = memory_grid(w, base, sw, seq_len, zeros)
                        smallest_mem = min(smallest_mem, min(grid.values()))
                        for zero, ckpt in [(z, c) for z in zeros for c in CHECKPOINTING]:
                            if grid[zero, ckpt] > gpu.hbm_gb * 1e9:
                                continue
                            t_min = _pipeline_bound((model_s + rec[ckpt]) / pp, wgrad_s / pp, pp, m, sched, v)
                            if t_min / (dp * mbs * m * seq_len) >= best:
                                continue  # its recompute alone makes it slower than the best so far
                            if _layout_bound(w, base, cluster, sw, seq_len, head_s, zero, ckpt) / (dp * mbs * m * seq_len) >= best:
                                continue  # its layers' own exposed traffic makes it slower than the best so far
                            lay = dataclasses.replace(base, zero=zero, checkpointing=ckpt)
                            est = estimate(w, lay, cluster, sw, seq_len)
                            priced += 1
                            if not est.fits:
                                continue
                            results.append(est)
                            best = min(best, est.step_time_s / est.tokens_per_step)
                            fitted_shard = shard > 1
                            break
    if not results:
        raise UserError(
            f"{w.name} fits no layout on {n} x {gpu.name}: the smallest peak memory found is "
            f"{smallest_mem / 2**30:.6g} GiB > {gpu.hbm_gb * 1e9 / 2**30:.1f} GiB; use more GPUs or a GPU with more memory"
        )
    results.sort(key=lambda e: e.step_time_s / e.tokens_per_step)
    return results[: space.keep], priced
