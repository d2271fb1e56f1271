"""Peak memory of the busiest GPU (the worst pipeline stage): states, activations, buffers; and a fit verdict.

States per parameter: bf16 weights (2 B), fp32 main gradients (4), fp32 master weights + Adam moments (12).
ZeRO inside the dp_shard x cp group (experts: dp_shard x cp / ep) splits the 12 (ZeRO-1), the 12 and the 4
(ZeRO-2), or all 18 (ZeRO-3 / FSDP, which gathers bf16 weights two layers at a time and keeps one layer of
unsharded gradients). DualPipe holds two stages' weights. Activations follow Korthikanti et al. (2022),
generalised to GQA/MLA, gated MLPs and experts (docs/plan.md); stage i of 1F1B holds min(m, p - i) microbatches.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    start = sum(layers[:stage])
    end = start + layers[stage]
    dense = max(0, min(end, w.n_layers - w.n_moe_layers) - start)
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


def shard_groups(lay: Layout) -> tuple[int, int]:
    """(ranks the dense states are split over, ranks the expert states are split over) under ZeRO."""
    if not lay.sharded:
        return 1, 1
    return lay.dp_shard * lay.cp, max(1, lay.dp_shard * lay.cp // lay.ep)


def state_bytes(lay: Layout, sw: Software, dense: float, expert: float, biggest: float) -> float:
    g_dense, g_expert = shard_groups(lay)
    grads = sw.grad_bytes

    def per(params: float, group: int) -> float:
        if lay.zero == 1 or group == 1:
            return params * (2 + grads + MASTER_AND_MOMENTS / group)
        if lay.zero == 2:
            return params * (2 + (grads + MASTER_AND_MOMENTS) / group)
        return params * (2 + grads + MASTER_AND_MOMENTS) / group

    states = per(dense, g_dense) + per(expert, g_expert)
    if lay.sharded and lay.zero == 3:
        states += 2 * 2 * biggest + grads * biggest  # two gathered layers in flight, one layer of full gradients
    if lay.sharded and lay.zero == 2:
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
                 per_token: tuple[float, float, float] | None = None) -> Memory:
    """Memory of one stage; `per_token` = activation bytes per token of a dense layer, an expert layer, and an
    expert layer without checkpointing (computed once per layout by estimate_memory)."""
    dense, expert, biggest = stage_params(w, lay, layers, stage)
    states = state_bytes(lay, sw, dense, expert, biggest)
    tokens = lay.microbatch_size * seq_len // lay.cp
    dense_layers, moe_layers = stage_split(w, layers, stage)
    shard_d = lay.tp if lay.sequence_parallel else 1
    per_token = per_token or _per_token(w, lay, sw, seq_len)
    if lay.checkpointing == "full":
        stored = (dense_layers + moe_layers) * 2 * w.d_model / shard_d  # the layer inputs only
        working = tokens * per_token[2]  # one layer rebuilt in its backward
    else:
        stored = dense_layers * per_token[0] + moe_layers * per_token[1]
        working = 0.0
    last = stage == lay.pp - 1
    logits = tokens * (w.vocab / lay.tp) * 6 if last else 0.0  # bf16 logits + fp32 loss temporaries
    comm = 2 * tokens * w.d_model * 2  # send/receive and all-gather staging buffers
    activations = tokens * stored * in_flight(lay, stage) + logits
    return Memory(states=states, activations=activations, buffers=working + comm, reserved=sw.reserved_gb * 1e9, stage=stage)


def estimate_memory(w: Workload, lay: Layout, sw: Software, seq_len: int, layers: tuple[int, ...] | None = None) -> Memory:
    """The busiest stage's memory; `layers` per stage default to the layout's split or an even one."""
    layers = layers or lay.stage_layers or even_stages(w.n_layers, lay.pp)
    # in-flight microbatches fall with the stage index, so only the first stage of each layer count can peak
    stages = {lay.pp - 1} | {layers.index(n) for n in set(layers)}
    per_token = _per_token(w, lay, sw, seq_len)
    return max((stage_memory(w, lay, sw, seq_len, layers, s, per_token) for s in stages), key=lambda mem: mem.total)


def _per_token(w: Workload, lay: Layout, sw: Software, seq_len: int) -> tuple[float, float, float]:
    if lay.checkpointing == "full":
        return 0.0, 0.0, activation_bytes_per_token(w, lay, sw, seq_len, "none", w.is_moe)
    return (activation_bytes_per_token(w, lay, sw, seq_len, moe=False) if w.n_moe_layers < w.n_layers else 0.0,
            activation_bytes_per_token(w, lay, sw, seq_len), 0.0)


def even_stages(n_layers: int, pp: int) -> tuple[int, ...]:
    base, extra = divmod(n_layers, pp)
    return tuple(base + (1 if i >= pp - extra else 0) for i in range(pp))
