"""Every default cost of replica-group recovery (torchft) in one place, each with where it comes from.

The first block is what the CPU fault-tolerance drill measures (kill a rank of one replica group, watch the others).
Each is one line: replace the number with the measured value and the note with its source. The second block is
taken from other parts of this repository or from torchft's own defaults. How the measured values scale to a
large cluster is in docs/simulate.md ("Replica recovery: what each failure costs").
"""

# -- measured on CPU by the fault-tolerance drill (placeholders until the drill reports; see docs/simulate.md) ----
DETECT_S = 5.0  # survivors drop a crashed peer group. Placeholder: the CPU gloo try (shared torchft-cpu.md) saw < 1 step of 0.1 s.
QUORUM_S = 5.0  # one quorum change + process-group reconfigure on the survivors. Placeholder, not yet measured.
GROUP_RESTART_S = 300.0  # a failed group's processes start, build the model and init (assumption: a job's reschedule_s).
TRANSFER_OVERHEAD_S = 5.0  # fixed cost of one peer state transfer (connect, metadata, (de)serialise). Placeholder.

# -- from torchft's defaults and this repository's catalogs ---------------------------------------------------------
TIMEOUT_S = 60.0  # a hung group is dropped when torchft's Manager `timeout` expires (default 60 s in torchft 0.2.0)
PEER_GBPS_PER_GPU = 40.0  # one GPU's scale-out link: ib-ndr 50 GB/s x 0.8 NCCL efficiency (plan/hardware.toml)
STATE_BYTES_PER_PARAM = 2 + 4 + 8  # bf16 weights + fp32 master + Adam moments (plan/forecast.py's checkpoint bytes)
PARAMS = 314e9  # Grok-1's parameters (models/presets.py), the default model
REPLICA_GROUP_GPUS = 1024  # grok-1 on 100k H100 per `gigafactory plan`: tp 8 x pp 16 x cp 4 x dp_shard 2 (97 groups)
