#!/usr/bin/env bash
# The post-training demo path on the KJV task: pre-train grok-tiny -> SFT -> DPO -> eval of each stage on the
# held-out split, then paired comparisons of the stages on the same items (docs/posttrain.md, "Measured").
# Usage: scripts/posttrain_demo.sh [OUT_DIR] [PRETRAIN_STEPS]; REJECTED=near|far picks DPO's rejected answers.
# On 2 CPU cores: ~50 min with 100 pre-training steps; a GPU: pass training.device flags via PRE_FLAGS etc.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/posttrain-demo}
STEPS=${2:-100}
REJECTED=${REJECTED:-near}
G=".venv/bin/python -m gigafactory.cli.main"
mkdir -p "$OUT"
$G eval --write-task "$OUT/task"
PAIRS="$OUT/task/kjv-pairs.jsonl"  # all 4,000 (the first 1,000 come from 12 books only: docs/posttrain.md)
[ "$REJECTED" = near ] || PAIRS="$OUT/task/kjv-pairs-$REJECTED.jsonl"
[ -d "$OUT/pre" ] || $G train --logging.run_dir "$OUT/pre" --training.steps "$STEPS" --checkpoint.every 100 ${PRE_FLAGS:-}
$G sft --checkpoint "$OUT/pre" --data "$OUT/task/kjv-train.jsonl" --logging.run_dir "$OUT/sft" --optimizer.lr 1e-3 ${SFT_FLAGS:-}
# 100 steps of 16 rows: one epoch of the 4,000 pairs (no pair seen twice); add --sft-weight 1.0 via DPO_FLAGS for RPO
$G dpo --checkpoint "$OUT/sft" --data "$PAIRS" --logging.run_dir "$OUT/dpo" --training.steps 100 \
    --training.eval_every 0 ${DPO_FLAGS:-}
for stage in pre sft dpo; do
    $G eval --checkpoint "$OUT/$stage" --out "$OUT/eval-$stage.json" ${EVAL_FLAGS:-}
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
print("| stage | answer log-lik/token | answer token acc | preference acc, near | preference acc, far | exact match | held-out ppl |")
print("|---|---|---|---|---|---|---|")
for stage in ("pre", "sft", "dpo"):
    r = json.load(open(f"{sys.argv[1]}/eval-{stage}.json"))
    t = r["kjv_task"]
    acc = {s: f"{p['preference_accuracy']:.3f}" if p else "-" for s, p in (t["preference"] or {}).items()}
    print(f"| {stage} | {t['answer_logp_per_token']:.3f} | {t['answer_token_accuracy']:.3f} | {acc.get('near', '-')} | "
          f"{acc.get('far', '-')} | {t['exact_match']:.3f} | {r['heldout']['perplexity']:.1f} |")
PY
# paired: each stage against the one before, on the same held-out items
$G eval --compare "$OUT/eval-pre.json" "$OUT/eval-sft.json" --out "$OUT/compare-pre-sft.json"
$G eval --compare "$OUT/eval-sft.json" "$OUT/eval-dpo.json" --out "$OUT/compare-sft-dpo.json"
$G eval --compare "$OUT/eval-pre.json" "$OUT/eval-dpo.json" --out "$OUT/compare-pre-dpo.json"   # the whole path
