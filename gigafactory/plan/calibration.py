"""The Megatron-LM weak-scaling runs (Narayanan et al., SC21, Table 1) the cost model is calibrated on.

Layouts per row (microbatch size, layers per virtual stage) are those of the paper's own reproduction script,
NVIDIA/Megatron-LM examples/sc21/run_table_1.sh; every run uses full (uniform) recompute on DGX A100 80 GB with
8x HDR InfiniBand per node (Selene), vocabulary 51,200 and sequence 2,048.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.plan.layout import Layout
from gigafactory.plan.workload import Workload, megatron_gpt

SEQ_LEN = 2048


@dataclass(frozen=True)
class MegatronRow:
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float  # published achieved TFLOP/s per GPU (recompute counted)
    microbatch: int  # from run_table_1.sh
    layers_per_virtual_stage: int  # 0 = no interleaving

    def workload(self) -> Workload:
        return megatron_gpt(self.hidden, self.layers, self.heads, seq_len=SEQ_LEN)

    def layout(self) -> Layout:
        dp = self.gpus // (self.tp * self.pp)
        v = (self.layers // self.pp) // self.layers_per_virtual_stage if self.layers_per_virtual_stage else 1
        return Layout(
            dp_replicate=dp, dp_shard=1, tp=self.tp, pp=self.pp, microbatch_size=self.microbatch,
            microbatches=self.batch // (dp * self.microbatch), schedule="interleaved_1f1b" if v > 1 else "1f1b",
            virtual_stages=v, checkpointing="full", sequence_parallel=False,
        )


TABLE1 = (
    MegatronRow(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 0),
    MegatronRow(3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 0),
    MegatronRow(7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 0),
    MegatronRow(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 0),
    MegatronRow(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 0),
    MegatronRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 5),
    MegatronRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 5),
    MegatronRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 3),
    MegatronRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 1),
    MegatronRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 0),
)
