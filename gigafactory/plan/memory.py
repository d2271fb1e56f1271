"""Peak memory of the busiest GPU (the first pipeline stage): states, activations, buffers; and a fit verdict.

States: bf16 weights (2 B) + fp32 master weights (4) + fp32 gradients (4) + Adam moments (8) per parameter.
DDP replicas keep all of it; FSDP (dp_shard) splits the fp32 master, gradients and moments over dp_shard x cp
(experts: over dp_shard x cp / ep) and gathers bf16 weights two layers at a time.
Activations follow Korthikanti et al. (2022), generalised to GQA, gated MLPs and experts (docs/plan.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.plan.layout import Layout, Software
from gigafactory.plan.workload import Workload

GIB = 2**30


@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU."""

    states: float  # weights, gradients, optimizer states (incl. gathered FSDP buffers)
    activations: float  # stored for the backward pass, all in-flight microbatches (+ logits on the last stage)
    buffers: float  # recompute working set, communication buffers
    reserved: float  # CUDA context, allocator fragmentation (Software.reserved_gb)

    @property
    def total(self) -> float:
        return self.states + self.activations + self.buffers + self.reserved


def local_params(w: Workload, lay: Layout) -> tuple[float, float, float]:
    """(dense params, expert params, params of one layer) held by one GPU of the first stage before FSDP."""
    layers = w.n_layers / lay.pp
    if w.is_moe:
        dense_layer = w.params_layer_dense / lay.tp
        expert_layer = w.params_expert * w.n_experts / (lay.tp * lay.ep)
    else:
        dense_layer = (w.params_layer_dense + w.params_expert * w.n_experts) / lay.tp
        expert_layer = 0.0
    embedding = w.vocab * w.d_model / lay.tp  # input embedding on stage 0 (the head sits on the last stage)
    if lay.pp == 1 and not w.tied_embeddings:
        embedding *= 2
    return layers * dense_layer + embedding, layers * expert_layer, dense_layer + expert_layer


def activation_bytes_per_token(w: Workload, lay: Layout, sw: Software, seq_len: int, checkpointing: str | None = None) -> float:
    """Bytes stored per token per layer for the backward pass under `checkpointing` (default: the layout's)."""
    checkpointing = checkpointing or lay.checkpointing
    tp, shard_d = lay.tp, (lay.tp if lay.sequence_parallel else 1)
    d = w.d_model
    # d-sized tensors: each norm's input, the attention input, the MLP input (+ 1-byte dropout masks)
    d_sized = (w.norms_per_layer + 2) * d * 2 + (2 * d if w.dropout else 0)
    # tp-sharded: q, k, v, attention output (the o-projection input)
    attn = (2 * w.q_width + 2 * w.kv_width) * 2 / tp
    ffn_tokens = w.top_k * sw.moe_imbalance if w.is_moe else 1.0
    mlp = (3 if w.gated else 2) * w.ffn_dim * 2 / tp * ffn_tokens + (3 * w.dense_ffn_dim * 2 / tp if w.dense_ffn_dim else 0)
    moe = (w.top_k * d * 2 * ffn_tokens / w.top_k) if w.is_moe else 0.0  # dispatched expert inputs
    s2 = 0.0
    if sw.attention == "unfused":  # softmax output (2 B), dropout mask (1 B), dropout output (2 B) per key
        s2 = w.n_heads / tp * seq_len * (5 if w.dropout else 2)
    if checkpointing == "selective":
        s2 = 0.0
        mlp -= w.ffn_dim * 2 / tp * ffn_tokens  # the activation product is recomputed
    return d_sized / shard_d + attn + mlp + moe + s2


def in_flight(lay: Layout) -> float:
    """Microbatches whose activations the first stage holds at its peak, in units of its own layers."""
    m, p, v = lay.microbatches, lay.pp, lay.virtual_stages
    if p == 1:
        return 1.0
    if lay.schedule == "gpipe":
        return float(m)
    if lay.schedule == "interleaved_1f1b":
        return min(m, p) * (1 + (p - 1) / (p * v))
    return float(min(m, p))  # 1f1b and zero_bubble (ZB-H1 keeps 1F1B's peak)


def estimate_memory(w: Workload, lay: Layout, sw: Software, seq_len: int) -> Memory:
    dense, expert, per_layer = local_params(w, lay)
    shard_dense = lay.dp_shard * lay.cp
    shard_expert = max(1, lay.dp_shard * lay.cp // lay.ep)
    if lay.dp_shard * lay.cp > 1 and lay.dp_shard > 1:
        states = 16 * (dense / shard_dense + expert / shard_expert) + 2 * 2 * per_layer + sw.grad_bytes * per_layer
    else:
        states = (16 + 2) * (dense + expert)
    tokens = lay.microbatch_size * seq_len // lay.cp
    layers = w.n_layers / lay.pp
    shard_d = lay.tp if lay.sequence_parallel else 1
    if lay.checkpointing == "full":
        stored = 2 * w.d_model / shard_d  # the layer input only
        working = tokens * activation_bytes_per_token(w, lay, sw, seq_len, "none")  # one layer rebuilt in its backward
    else:
        stored, working = activation_bytes_per_token(w, lay, sw, seq_len), 0.0
    logits = tokens * (w.vocab / lay.tp) * 6  # bf16 logits + fp32 loss temporaries (last stage)
    comm = 2 * tokens * w.d_model * 2  # send/receive and all-gather staging buffers
    first = tokens * stored * layers * in_flight(lay) + (logits if lay.pp == 1 else 0.0)
    last = tokens * stored * layers * (1 if lay.pp > 1 else in_flight(lay)) + logits
    activations = max(first, last)
    return Memory(states=states, activations=activations, buffers=working + comm, reserved=sw.reserved_gb * 1e9)
