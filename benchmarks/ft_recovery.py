"""What one replica-group failure costs under torchft, measured on this machine: the simulator's inputs.

Runs `gigafactory train --nproc 2 --fault_tolerance.enabled true` (two replica groups of one process, gloo) at two
model sizes, SIGKILLs group 1 mid-step, and reads the groups' events:

- detect_s:   kill -> the survivor's first quorum without the dead group (it committed the failed step alone);
- restart_s:  kill -> the restarted group's processes are up and ask for a quorum (torchrun restart + import +
              model build);
- wait_s:     -> the survivor reaches its next step boundary and the quorum with both groups forms;
- transfer_s: -> the state (model, optimizer, step) has come from the live peer and is loaded (load_s of it);
- bytes:      the state moved; transfer_s against bytes across the two sizes gives the fixed cost and bandwidth.

    python benchmarks/ft_recovery.py            # a few minutes on 2 CPU cores; one JSON line per size, then the
                                                # simulator's prediction of each kill-to-rejoin time
    python benchmarks/ft_recovery.py --from OUT # the prediction again from saved output
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4, "moe_ffn_dim": 128, "vocab_size": 512},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "n_experts": 8, "moe_ffn_dim": 512, "vocab_size": 512},
}
KILL_STEP, STEPS = 10, 60
HEARTBEAT_TIMEOUT_S = 3.0  # the lighthouse `train --nproc` starts (fault_tolerance.heartbeat_timeout_ms default)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(name: str, model: dict, root: Path) -> dict:
    run = root / name
    cmd = [sys.executable, "-m", "gigafactory.cli.main", "train", "--nproc=2", *[f"--model.{k}={v}" for k, v in model.items()],
           "--model.max_seq_len=64", "--data.seq_len=32", "--training.batch_size=4", f"--training.steps={STEPS}", "--training.eval_every=0",
           "--training.dtype=fp32", f"--checkpoint.every={STEPS}", f"--logging.run_dir={run}", "--logging.progress=false",
           "--logging.tensorboard=false", "--logging.log_every=1", "--faults.delay_s=0.1", "--fault_tolerance.enabled=true", "--fault_tolerance.timeout_s=10",
           "--faults.replica_id=1", f"--faults.kill_step={KILL_STEP}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    g0, g1 = read_events(run / "group0" / "events.jsonl"), read_events(run / "group1" / "events.jsonl")
    kill = next(e for e in g1 if e["event"] == "fault_injected")["time"]
    alone = next(e for e in g0 if e["event"] == "ft_quorum" and e["participants"] == 1)
    rejoined = next(e for e in g0 if e["event"] == "ft_quorum" and e["participants"] == 2 and e["time"] > alone["time"])
    heal = next(e for e in g1 if e["event"] == "ft_heal")
    ready = heal["time"] - heal["quorum_s"]
    steps = [json.loads(line) for line in (run / "group0" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    normal = sorted(r["step_time"] for r in steps)[len(steps) // 2]
    return {"size": name, "bytes": heal["bytes"], "detect_s": round(alone["time"] - kill, 3),
            "restart_s": round(ready - kill, 3), "wait_s": round(rejoined["time"] - ready, 3),
            "transfer_s": round(heal["time"] - rejoined["time"], 3), "load_s": heal["load_s"],
            "kill_to_rejoin_s": round(heal["time"] - kill, 3), "median_step_s": round(normal, 4),
            "survivor_steps_alone": heal["to_step"] - KILL_STEP + 1}


def predict(rows: list[dict]) -> list[dict]:
    """The simulator's model of a rejoin (gigafactory.simulate.recovery.RecoverySpec.rejoin_breakdown) with constants
    from these runs: restart time from the smallest size, transfer bandwidth and fixed cost from the line through
    (bytes, transfer_s) of the sizes; it then predicts every size's kill-to-rejoin time."""
    from gigafactory.simulate.recovery import RecoverySpec

    (b0, t0), (b1, t1) = [(r["bytes"], r["transfer_s"]) for r in (rows[0], rows[-1])]
    per_byte = (t1 - t0) / (b1 - b0)
    overhead = max(0.0, t0 - b0 * per_byte)
    quorum = max(0.0, min(r["detect_s"] for r in rows) - HEARTBEAT_TIMEOUT_S)  # what detection takes beyond the heartbeat timeout
    out = []
    for r in rows:
        spec = RecoverySpec(recovery="replica", replica_group_gpus=1, params=float(r["bytes"]), state_bytes_per_param=1.0,
                            peer_gbps_per_gpu=1.0 / per_byte / 1e9, transfer_overhead_s=overhead, quorum_s=quorum,
                            group_restart_s=rows[0]["restart_s"])
        parts = spec.rejoin_breakdown(class_detect_s=0.0, step_time_s=r["median_step_s"])
        out.append({"size": r["size"], "measured_s": r["kill_to_rejoin_s"], "predicted_s": round(parts["total_s"], 3),
                    "error": round(parts["total_s"] / r["kill_to_rejoin_s"] - 1, 3), "peer_MBps": round(1e-6 / per_byte, 1),
                    "overhead_s": round(overhead, 3), "quorum_s": round(quorum, 3)})
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--from":  # re-analyse saved output lines
        rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.startswith('{"size"')]
    else:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in SIZES.items():
                rows.append(measure(name, model, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    for row in predict(rows):
        print(json.dumps({"prediction": row}), flush=True)


if __name__ == "__main__":
    main()
