#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on one H100), run from the repository root:
#   bash benchmarks/gpu.sh [SECTION ...]     sections: checks moe moe-compiled moe-fp8 dense dense-fp8 layer profile peer
#                                            (default: all)
# 1. benchmarks/gpu_checks.py: bf16 matmul peak; grouped-GEMM experts, fused capped attention and the chunked head
#    loss against float64 / materialised references, their speed and memory; KV-cached = uncached decoding on CUDA.
# Exits 1 if any section failed (each section still runs).
# 2. `gigafactory train` on grok-1b-moe (MoE, eager and torch.compile) and a dense twin: tokens/s, MFU, peak memory.
#    The same with --training.precision fp8 (torchao float8 projections; experts stay bf16).
# 3. benchmarks/grok1_layer.py: one Grok-1 layer at its real shapes, bf16 vs fp8 (the planner's efficiencies).
# 4. benchmarks/train_cpu.py --device cuda: ours vs HF transformers' Mixtral of the same shape, same process.
# Uses the venv's python when there is one, else python3 (the GPU image has torch, tokenizers, rich, transformers).
# Logs go to $OUT when it is set (the device tool's output folder), else runs/gpu-bench.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOGS=${OUT:-runs/gpu-bench}
SECTIONS=" ${*:-checks moe moe-compiled moe-fp8 dense dense-fp8 layer profile peer} "
want() { [[ $SECTIONS == *" $1 "* ]]; }
FAILED=()
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if want checks; then
  echo "== checks"
  timeout 170 $PY benchmarks/gpu_checks.py 2>&1 | tee "$LOGS/checks.log" | grep -v Warning
  grep -q "FAIL" "$LOGS/checks.log" && FAILED+=(checks)
fi

COMMON=(--training.device cuda --training.dtype bf16 --training.steps 20 --training.eval_every 0 --optimizer.warmup_steps 5
        --checkpoint.every 0 --logging.log_every 1 --logging.tensorboard false --logging.progress false
        --data.seq_len 4096 --training.batch_size 8 --resilience.watchdog_timeout_s 0)
train() {
  local name=$1; shift
  want "$name" || return 0
  local dir=runs/gpu-bench/$name
  rm -rf "$dir"
  echo "== $name: gigafactory train $* (+ common flags in benchmarks/gpu.sh)"
  timeout 150 $PY -m gigafactory.cli.main train "$@" "${COMMON[@]}" --logging.run_dir "$dir" > "$LOGS/$name.log" 2>&1 \
    || { echo "  FAILED:"; tail -5 "$LOGS/$name.log"; FAILED+=("$name"); return 0; }
  $PY - "$dir" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"tokens_per_s"' in l][8:]  # skip warm-up
print(f"  tokens/s {statistics.median(r['tokens_per_s'] for r in rows):,.0f}  MFU {statistics.median(r['mfu'] for r in rows):.1%}"
      f"  peak memory {max(r.get('max_memory_gib', 0) for r in rows):.1f} GiB  loss {rows[-1]['loss']:.3f}")
PYEOF
}
# MoE: grok-1b-moe (0.9B total, 0.28B active per token), 8 x 4096 tokens per step.
train moe --preset grok-1b-moe
train moe-compiled --preset grok-1b-moe --training.compile true
train moe-fp8 --preset grok-1b-moe --training.compile true --training.precision fp8
# Dense: the same shape with one expert of 4x width (every token uses all FFN weights).
DENSE=(--preset grok-1b-moe --model.n_experts 1 --model.top_k 1 --model.moe_ffn_dim 8192 --model.aux_loss_weight 0)
train dense "${DENSE[@]}"
train dense-fp8 "${DENSE[@]}" --training.precision fp8

if want layer; then
  echo "== layer: one Grok-1 layer (6144, 48/8 heads, 8 x 32768 experts, top-2), 1 x 4096 tokens, bf16 vs fp8"
  GPU=h100; nvidia-smi --query-gpu=name --format=csv,noheader | grep -qi h200 && GPU=h200
  timeout 170 $PY benchmarks/grok1_layer.py --device cuda --gpu "$GPU" 2>&1 | tee "$LOGS/layer.log" | grep -v Warning
  grep -q "ratio" "$LOGS/layer.log" || FAILED+=(layer)
fi

if want profile; then
  echo "== profile: one grok-1b-moe step under torch.profiler (top ops; trace in \$LOGS/step.json)"
  timeout 120 $PY benchmarks/profile_step.py --device cuda --preset grok-1b-moe --dtype bf16 --batch 4 --seq 2048 --trace "$LOGS/step.json" \
    2>&1 | tee "$LOGS/profile.log" | grep -v Warning | tail -15 || FAILED+=(profile)
fi

if want peer; then
  echo "== peer: ours vs HF MixtralForCausalLM, grok-1b-moe shape"
  timeout 150 $PY benchmarks/train_cpu.py --device cuda --preset grok-1b-moe --dtype bf16 --batch 4 --seq 2048 --steps 5 \
    2>&1 | tee "$LOGS/peer.log" | grep -v Warning | tail -6
  grep -q "ratio ours/HF" "$LOGS/peer.log" || FAILED+=(peer)
fi
if (( ${#FAILED[@]} )); then echo "FAILED sections: ${FAILED[*]}"; exit 1; fi
