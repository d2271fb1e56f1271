"""A parallel layout (what `gigafactory train` runs) and the software stack assumptions that price it.

Mesh order, outermost to innermost: pp, dp_replicate, dp_shard, cp, tp (torchtitan's). Expert parallel borrows
its ranks from dp_shard x cp (innermost first), so world = dp_replicate * dp_shard * cp * tp * pp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gigafactory.config.fields import knob

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipe")
PRECISIONS = ("bf16", "fp8")
REDUCE_DTYPES = ("fp32", "bf16")
CHECKPOINTING = ("none", "selective", "full")
# Key names of the [parallel] config section that `gigafactory train` reads.
TOML_KEYS = ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp", "schedule", "microbatches", "activation_checkpointing")


@dataclass(frozen=True)
class Layout:
    """Parallel degrees, pipeline schedule, microbatching and activation checkpointing of one training job."""

    dp_replicate: int = knob(1, "Data-parallel replicas (DDP, or the outer axis of HSDP).")
    dp_shard: int = knob(1, "FSDP shards: parameters, gradients and optimizer states are split this many ways.")
    tp: int = knob(1, "Tensor-parallel degree (Megatron column/row split).")
    pp: int = knob(1, "Pipeline stages.")
    ep: int = knob(1, "Expert-parallel degree (taken from dp_shard x cp).")
    cp: int = knob(1, "Context-parallel degree (ring attention over sequence chunks).")
    microbatch_size: int = knob(1, "Sequences per microbatch per data-parallel rank.")
    microbatches: int = knob(1, "Microbatches per step per pipeline (gradient accumulation when pp=1).")
    schedule: str = knob("1f1b", "Pipeline schedule (dualpipe: DeepSeek-V3's bidirectional schedule).", choices=SCHEDULES)
    virtual_stages: int = knob(1, "Model chunks per pipeline rank (interleaved_1f1b only).")
    checkpointing: str = knob("none", "Activation checkpointing.", choices=CHECKPOINTING)
    sequence_parallel: bool = knob(True, "Shard norms/residual activations over tp (Korthikanti et al. 2022).")
    zero: int = knob(3, "ZeRO stage inside the dp_shard group: 1 optimizer states, 2 + gradients, 3 + weights (FSDP); "
                        "ignored when dp_shard = 1 (DDP). dp_replicate > 1 with dp_shard > 1 is HSDP.", choices=(0, 1, 2, 3))
    reduce_dtype: str = knob("fp32", "dtype of the gradient reduce-scatter / all-reduce.", choices=REDUCE_DTYPES)
    precision: str = knob("bf16", "GEMM precision of the layers (fp8: DeepSeek-V3-style, head and attention core stay bf16).", choices=PRECISIONS)
    stage_layers: tuple = knob((), "Layers per pipeline stage, first to last (uneven allowed); empty = balanced by the planner.")

    @property
    def sharded(self) -> bool:
        """Whether states are split over dp_shard (ZeRO 1-3); otherwise every data-parallel rank holds them all."""
        return self.dp_shard > 1 and self.zero > 0

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.dp * self.microbatch_size * self.microbatches

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def toml(self) -> str:
        """The `[parallel]` section (plus the microbatch size) that runs this layout under `gigafactory train`.

        The trainer's mesh keeps ep as its own axis (world = dp_replicate * dp_shard * ep * cp * tp * pp, and ep
        ranks read different data), so the dp_shard written here is the planner's dp_shard / ep."""
        train_dp_shard = self.dp_shard // self.ep if self.ep > 1 and self.dp_shard % self.ep == 0 else self.dp_shard
        values: dict = {
            "dp_replicate": self.dp_replicate, "dp_shard": train_dp_shard, "tp": self.tp, "pp": self.pp,
            "ep": self.ep, "cp": self.cp, "schedule": self.schedule, "microbatches": self.microbatches,
            "activation_checkpointing": self.checkpointing,
        }
        lines = ["[parallel]"] + [f"{k} = {v!r}".replace("'", '"') for k, v in values.items()]
        extra = f"zero={self.zero} reduce_dtype={self.reduce_dtype} precision={self.precision}"
        if self.schedule == "dualpipe":
            extra += " (the trainer has no dualpipe schedule: run zero_bubble there)"
        if self.stage_layers:
            extra += " stage_layers=" + "+".join(map(str, self.stage_layers))
        lines.insert(1, f"# priced by the planner, not read by the trainer: {extra}")
        if self.ep > 1 and self.dp_shard % self.ep:
            lines.insert(1, f"# ep={self.ep} borrows from dp_shard x cp here; the trainer needs dp_shard * ep * cp = {self.dp_shard * self.cp}")
        lines += ["", "[training]", f"batch_size = {self.microbatch_size}  # sequences per microbatch per data-parallel rank"]
        if self.pp == 1:
            lines.append(f"grad_accum_steps = {self.microbatches}")
        if self.schedule == "interleaved_1f1b":
            lines.insert(1, f"# {self.virtual_stages} model chunks per pipeline rank")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Software:
    """What the training stack does well or badly: kernels and overlap. Hardware-independent, model-independent."""

    name: str = knob("torchtitan-2025", "Display name of the stack.")
    attention: str = knob("flash", "'flash' (fused, no s^2 tensors) or 'unfused' (softmax and dropout in HBM).", choices=("flash", "unfused"))
    flash_fwd_efficiency: float = knob(0.60, "Fraction of peak of the fused attention forward (FlashAttention-2/3 papers report 0.5-0.75).")
    flash_bwd_efficiency: float = knob(0.45, "Fraction of peak of the fused attention backward (about 2.5x the forward FLOPs).")
    hbm_efficiency: float = knob(0.85, "Achieved fraction of HBM bandwidth in memory-bound kernels (STREAM-like copies).")
    kernel_overhead_us: float = knob(4.0, "Launch and tail time added to every GEMM, microseconds.")
    tp_overlap: float = knob(0.5, "Fraction of tensor-parallel communication hidden behind GEMMs (async TP).")
    dp_overlap: bool = knob(True, "Gradient reduction overlaps the backward passes; ZeRO-1/2 weight gathers overlap the first forward.")
    comm_sms: int = knob(20, "SMs given to communication kernels while all-to-alls overlap compute (DeepSeek-V3: 20 of 132).")
    moe_imbalance: float = knob(1.1, "Tokens on the busiest expert rank / the mean (router load imbalance).")
    reserved_gb: float = knob(4.0, "GPU memory not available to the model (CUDA context, NCCL buffers, fragmentation), GB.")
    grad_bytes: int = knob(4, "Bytes per gradient element in reductions and accumulation (fp32).")


MODERN = Software()
# Megatron-LM as run for Narayanan et al. (SC21): no fused attention, no async TP, DDP (fp32 grads).
MEGATRON_SC21 = Software(name="megatron-sc21", attention="unfused", tp_overlap=0.0, moe_imbalance=1.0)
