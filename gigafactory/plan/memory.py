"""Peak memory of the busiest GPU (the worst pipeline stage): states, activations, buffers; and a fit verdict.

States per parameter: bf16 weights (2 B), fp32 main gradients (4), fp32 master weights + Adam moments (12).
ZeRO inside the dp_shard x cp group (experts: dp_shard x cp / ep) splits the 12 (ZeRO-1), the 12 and the 4
(ZeRO-2), or all 18 (ZeRO-3 / FSDP, which gathers bf16 weights two layers at a time and keeps one layer of
unsharded gradients). DualPipe holds two stages' weights. Activations follow Korthikanti et al. (2022),
generalised to GQA/MLA, gated MLPs and experts (docs/plan.md); stage i of 1F1B holds min(m, p - i) microbatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from gigafactory.plan.compute import expert_load, mlp_activation_elems
from gigafactory.plan.layout import Layout, Software
from gigafactory.plan.pipeline import in_flight
from gigafactory.plan.workload import Workload

GIB = 2**30
MASTER_AND_MOMENTS = 12  # fp32 master weights + Adam m and v, bytes per parameter


@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU."""

    states: float  # weights, gradients, optimizer states (incl. gathered FSDP buffers)
    activations: float  # stored for the backward pass, all in-flight microbatches (+ logits on the last stage)
    buffers: float  # recompute working set, communication buffers
    reserved: float  # CUDA context, allocator fragmentation (Software.reserved_gb)
    stage: int = 0  # the pipeline stage this is

    @property
    def total(self) -> float:
        return self.states + self.activations + self.buffers + self.reserved


def stage_split(w: Workload, layers: tuple[int, ...], stage: int) -> tuple[int, int]:
    """(dense leading layers, expert layers) that `stage` holds; dense layers come first in the model."""
    leading = w.n_layers - w.n_moe_layers
    if leading == 0:
        return 0, layers[stage]
    if leading == w.n_layers:
        return layers[stage], 0
    start = sum(layers[:stage])
    dense = max(0, min(start + layers[stage], leading) - start)
    return dense, layers[stage] - dense


def stage_params(w: Workload, lay: Layout, layers: tuple[int, ...], stage: int) -> tuple[float, float, float]:
    """(non-expert params, expert params, params of its largest layer) on one GPU of `stage`."""
    dense_layers, moe_layers = stage_split(w, layers, stage)
    d_dense, _ = w.layer_params(False)
    m_dense, m_expert = w.layer_params(True) if w.is_moe else (d_dense, 0.0)
    dense = (dense_layers * d_dense + moe_layers * m_dense) / lay.tp
    expert = moe_layers * m_expert / (lay.tp * lay.ep)
    table = w.vocab * w.d_model / lay.tp
    if stage == 0:
        dense += table
    if stage == lay.pp - 1 and (lay.pp > 1 or not w.tied_embeddings):
        dense += table
    biggest = max(d_dense / lay.tp if dense_layers else 0.0, (m_dense / lay.tp + m_expert / (lay.tp * lay.ep)) if moe_layers else 0.0)
    return dense, expert, biggest


def shard_groups(lay: Layout, zero: int | None = None) -> tuple[int, int]:
    """(ranks the dense states are split over, ranks the expert states are split over) under ZeRO (default: the
    layout's stage)."""
    zero = lay.zero if zero is None else zero
    if lay.dp_shard <= 1 or zero == 0:
        return 1, 1
    return lay.dp_shard * lay.cp, max(1, lay.dp_shard * lay.cp // lay.ep)


def state_bytes(lay: Layout, sw: Software, dense: float, expert: float, biggest: float, zero: int | None = None) -> float:
    zero = lay.zero if zero is None else zero
    g_dense, g_expert = shard_groups(lay, zero)
    grads = sw.grad_bytes
    sharded = lay.dp_shard > 1 and zero > 0

    def per(params: float, group: int) -> float:
        if zero == 1 or group == 1:
            return params * (2 + grads + MASTER_AND_MOMENTS / group)
        if zero == 2:
            return params * (2 + (grads + MASTER_AND_MOMENTS) / group)
        return params * (2 + grads + MASTER_AND_MOMENTS) / group

    states = per(dense, g_dense) + per(expert, g_expert)
    if sharded and zero == 3:
        states += 2 * 2 * biggest + grads * biggest  # two gathered layers in flight, one layer of full gradients
    if sharded and zero == 2:
        states += grads * biggest  # the bucket being reduce-scattered
    return states * (2 if lay.schedule == "dualpipe" else 1)


def activation_bytes_per_token(w: Workload, lay: Layout, sw: Software, seq_len: int, checkpointing: str | None = None,
                               moe: bool = True) -> float:
    """Bytes stored per token per layer for the backward pass under `checkpointing` (default: the layout's)."""
    checkpointing = checkpointing or lay.checkpointing
    moe = moe and w.is_moe
    tp, shard_d = lay.tp, (lay.tp if lay.sequence_parallel else 1)
    d = w.d_model
    # d-sized tensors: each norm's input, the attention input, the MLP input (+ 1-byte dropout masks)
    d_sized = (w.norms_per_layer + 2) * d * 2 + (2 * d if w.dropout else 0)
    # tp-sharded: q, k, v, attention output (the o-projection input); MLA adds its latent
    attn = (w.n_heads * (2 * w.qk_head_dim + 2 * w.value_head_dim)) * 2 / tp if w.attention == "mla" else \
        (2 * w.q_width + 2 * w.kv_width) * 2 / tp
    if w.attention == "mla":
        attn += (w.kv_lora_rank + w.q_lora_rank) * 2
    mlp = mlp_activation_elems(w, sw, tp, moe) * 2
    dispatched = d * 2 * w.top_k * expert_load(w, sw) / shard_d if moe else 0.0  # expert inputs after dispatch
    if lay.precision == "fp8":  # GEMM inputs are kept in fp8 for the weight gradient
        mlp *= 0.75
    s2 = 0.0
    if sw.attention == "unfused":  # softmax output (2 B), dropout mask (1 B), dropout output (2 B) per key
        s2 = w.n_heads / tp * seq_len * (5 if w.dropout else 2)
    if checkpointing == "selective":
        s2 = 0.0
        ffn_tokens = (w.top_k * expert_load(w, sw) + w.n_shared_experts) if moe else 1.0
        mlp -= w.ffn_dim * 2 / tp * ffn_tokens  # the activation product is recomputed
    return d_sized / shard_d + attn + mlp + dispatched + s2


def stage_memory(w: Workload, lay: Layout, sw: Software, seq_len: int, layers: tuple[int, ...], stage: int,
                 per_token: tuple[float, float, float] | None = None, checkpointing: str | None = None) -> Memory:
    """Memory of one stage; `per_token` = activation bytes per token of a dense layer, an expert layer, and an
    expert layer without checkpointing (computed once per layout by estimate_memory)."""
    states = state_bytes(lay, sw, *stage_params(w, lay, layers, stage))
    activations, buffers = _stage_activations(w, lay, sw, seq_len, layers, stage, per_token, checkpointing)
    return Memory(states=states, activations=activations, buffers=buffers, reserved=sw.reserved_gb * 1e9, stage=stage)


def _stage_activations(w: Workload, lay: Layout, sw: Software, seq_len: int, layers: tuple[int, ...], stage: int,
                       per_token: tuple[float, float, float] | None, checkpointing: str | None) -> tuple[float, float]:
    """(activations held for the backward, working buffers) of one stage."""
    tokens = lay.microbatch_size * seq_len // lay.cp
    dense_layers, moe_layers = stage_split(w, layers, stage)
    shard_d = lay.tp if lay.sequence_parallel else 1
    checkpointing = checkpointing or lay.checkpointing
    per_token = per_token or _per_token(w, lay, sw, seq_len, checkpointing)
    if checkpointing == "full":
        stored = (dense_layers + moe_layers) * 2 * w.d_model / shard_d  # the layer inputs only
        working = tokens * per_token[2]  # one layer rebuilt in its backward
    else:
        stored = dense_layers * per_token[0] + moe_layers * per_token[1]
        working = 0.0
    last = stage == lay.pp - 1
    logits = tokens * (w.vocab / lay.tp) * 6 if last else 0.0  # bf16 logits + fp32 loss temporaries
    comm = 2 * tokens * w.d_model * 2  # send/receive and all-gather staging buffers
    return tokens * stored * in_flight(lay, stage) + logits, working + comm


def estimate_memory(w: Workload, lay: Layout, sw: Software, seq_len: int, layers: tuple[int, ...] | None = None) -> Memory:
    """The busiest stage's memory; `layers` per stage default to the layout's split or an even one."""
    layers = layers or lay.stage_layers or even_stages(w.n_layers, lay.pp)
    # in-flight microbatches fall with the stage index, so only the first stage of each layer count can peak
    stages = {lay.pp - 1} | {layers.index(n) for n in set(layers)}
    per_token = _per_token(w, lay, sw, seq_len)
    return max((stage_memory(w, lay, sw, seq_len, layers, s, per_token) for s in stages), key=lambda mem: mem.total)


def _per_token(w: Workload, lay: Layout, sw: Software, seq_len: int, checkpointing: str | None = None) -> tuple[float, float, float]:
    checkpointing = checkpointing or lay.checkpointing
    if checkpointing == "full":
        return 0.0, 0.0, activation_bytes_per_token(w, lay, sw, seq_len, "none", w.is_moe)
    return (activation_bytes_per_token(w, lay, sw, seq_len, checkpointing, moe=False) if w.n_moe_layers < w.n_layers else 0.0,
            activation_bytes_per_token(w, lay, sw, seq_len, checkpointing), 0.0)


@lru_cache(maxsize=4096)
def even_stages(n_layers: int, pp: int) -> tuple[int, ...]:
    base, extra = divmod(n_layers, pp)
    return tuple(base + (1 if i >= pp - extra else 0) for i in range(pp))


def memory_grid(w: Workload, lay: Layout, sw: Software, seq_len: int, zeros: tuple[int, ...]) -> dict[tuple[int, str], float]:
    """Peak bytes of `lay` under each (ZeRO stage, checkpointing) choice, sharing the per-stage work (the search
    asks for all nine). States depend only on the ZeRO stage, activations only on the checkpointing."""
    layers = lay.stage_layers or even_stages(w.n_layers, lay.pp)
    stages = {lay.pp - 1} | {layers.index(n) for n in set(layers)}
    out: dict[tuple[int, str], float] = {}
    ckpts = ("none", "selective", "full")
    acts = {}
    params = {s: stage_params(w, lay, layers, s) for s in stages}
    for c in ckpts:
        per_token = _per_token(w, lay, sw, seq_len, c)
        for s in stages:
            acts[c, s] = sum(_stage_activations(w, lay, sw, seq_len, layers, s, per_token, c)) + sw.reserved_gb * 1e9
    for z in zeros:
        states = {s: state_bytes(lay, sw, *params[s], zero=z) for s in stages}
        for c in ckpts:
            out[z, c] = max(states[s] + acts[c, s] for s in stages)
    return out
