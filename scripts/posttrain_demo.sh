#!/usr/bin/env bash
# The post-training demo path on the KJV task: pre-train grok-tiny -> SFT -> DPO -> eval of each stage on the
# held-out split (docs/posttrain.md, "Measured"). Usage: scripts/posttrain_demo.sh [OUT_DIR] [PRETRAIN_STEPS]
# On 2 CPU cores: ~40 min with 100 pre-training steps; a GPU: pass training.device flags via PRE_FLAGS etc.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/posttrain-demo}
STEPS=${2:-100}
G=".venv/bin/python -m gigafactory.cli.main"
mkdir -p "$OUT"
$G eval --write-task "$OUT/task"
head -1000 "$OUT/task/kjv-pairs.jsonl" > "$OUT/pairs-1000.jsonl"
[ -d "$OUT/pre" ] || $G train --logging.run_dir "$OUT/pre" --training.steps "$STEPS" --checkpoint.every 100 ${PRE_FLAGS:-}
$G sft --checkpoint "$OUT/pre" --data "$OUT/task/kjv-train.jsonl" --logging.run_dir "$OUT/sft" --optimizer.lr 1e-3 ${SFT_FLAGS:-}
$G dpo --checkpoint "$OUT/sft" --data "$OUT/pairs-1000.jsonl" --logging.run_dir "$OUT/dpo" --training.steps 40 \
    --training.eval_every 20 --sft-weight 1.0 ${DPO_FLAGS:-}
for stage in pre sft dpo; do
    $G eval --checkpoint "$OUT/$stage" --out "$OUT/eval-$stage.json" ${EVAL_FLAGS:-}
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
print("| stage | answer log-lik/token | answer token acc | preference acc | exact match | held-out ppl |")
print("|---|---|---|---|---|---|")
for stage in ("pre", "sft", "dpo"):
    r = json.load(open(f"{sys.argv[1]}/eval-{stage}.json"))
    t, p = r["kjv_task"], r["kjv_task"]["preference"] or {}
    print(f"| {stage} | {t['answer_logp_per_token']:.3f} | {t['answer_token_accuracy']:.3f} | "
          f"{p.get('preference_accuracy', float('nan')):.3f} | {t['exact_match']:.3f} | {r['heldout']['perplexity']:.1f} |")
PY
