#!/usr/bin/env bash
# One prepared GPU check (< 10 minutes on one H100): training tokens/s, MFU and peak memory for a dense and an MoE
# model sized to fill the GPU, bf16, single GPU. Prints the command line of each run and its steady-state metrics.
#   bash benchmarks/gpu.sh            (run from the repository root, after ./scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
COMMON=(--training.device cuda --training.dtype bf16 --training.steps 30 --training.eval_every 0 --optimizer.warmup_steps 5
        --checkpoint.every 0 --logging.log_every 1 --logging.tensorboard false --logging.progress false
        --data.seq_len 4096 --parallel.activation_checkpointing full --resilience.watchdog_timeout_s 0)
run() {
  local name=$1; shift
  local dir=runs/gpu-bench/$name
  rm -rf "$dir"
  echo "== $name: gigafactory train $* ${COMMON[*]} --logging.run_dir $dir"
  $PY -m gigafactory.cli.main train "$@" "${COMMON[@]}" --logging.run_dir "$dir" > "$dir.log" 2>&1 || { tail -20 "$dir.log"; return 1; }
  $PY - "$dir" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"tokens_per_s"' in l][10:]  # skip warm-up
print(f"  tokens/s {statistics.median(r['tokens_per_s'] for r in rows):,.0f}  MFU {statistics.median(r['mfu'] for r in rows):.1%}"
      f"  peak memory {max(r.get('max_memory_gib', 0) for r in rows):.1f} GiB  loss {rows[-1]['loss']:.3f}")
PYEOF
}
# MoE: grok-1b-moe (0.9B total, 0.28B active per token).
run moe --preset grok-1b-moe --training.batch_size 8
# Dense: the same shape with one expert of 4x width (every token uses all FFN weights).
run dense --preset grok-1b-moe --model.n_experts 1 --model.top_k 1 --model.moe_ffn_dim 8192 --model.aux_loss_weight 0 --training.batch_size 8
