"""Every default cost of replica-group recovery (torchft) in one place, each with where it comes from.

The first block is what the CPU fault-tolerance drill measures (kill a rank of one replica group, watch the others).
Each is one line: replace the number with the measured value and the note with its source. The second block is
taken from other parts of this repository or from torchft's own defaults. How the measured values scale to a
large cluster is in docs/simulate.md ("Replica recovery: what each failure costs").
"""

# -- measured by the CPU drill (benchmarks/ft_recovery.py: 2 groups of 1 process, gloo; docs/benchmarks.md) ---------
DETECT_S = 5.0  # survivors drop a crashed group when the lighthouse misses its heartbeats: torchft's default heartbeat
#                 timeout (5000 ms). Measured: detection = heartbeat timeout + 0.02-0.07 s (3.02 / 3.03 / 3.07 s at 3 s).
QUORUM_S = 5.0  # one quorum change + process-group reconfigure. Measured 0.02 s on CPU gloo with 2 groups; NCCL
#                 communicator setup across ~100 groups is not measured here: kept at 5 s (an assumption).
GROUP_RESTART_S = 300.0  # a failed group's restart: measured 3.8-4.5 s on CPU (torchrun restart + import + model
#                 build); at scale a spare node is scheduled and CUDA/NCCL initialised: kept at a job's reschedule_s.
TRANSFER_OVERHEAD_S = 0.06  # fixed cost of one peer transfer: intercept of transfer time vs bytes, measured 0.055 s
#                 (3 MB in 0.079 s, 162 MB in 1.35 s incl. deserialising: 125 MB/s per process over HTTP on 2 cores).

# -- from torchft's defaults and this repository's catalogs ---------------------------------------------------------
TIMEOUT_S = 60.0  # a hung group is dropped when torchft's Manager `timeout` expires (default 60 s in torchft 0.2.0)
PEER_GBPS_PER_GPU = 40.0  # one GPU's scale-out link: ib-ndr 50 GB/s x 0.8 NCCL efficiency (plan/hardware.toml)
STATE_BYTES_PER_PARAM = 2 + 4 + 8  # bf16 weights + fp32 master + Adam moments (plan/forecast.py's checkpoint bytes)
PARAMS = 314e9  # Grok-1's parameters (models/presets.py), the default model
REPLICA_GROUP_GPUS = 1024  # grok-1 on 100k H100 per `gigafactory plan`: tp 8 x pp 16 x cp 4 x dp_shard 2 (97 groups)
