"""Print the planner's calibration table (Megatron-LM SC21 Table 1), its validation table (published runs it was
never fitted on) and the search's speed on grok-1 at 1k..100k H100. docs/plan.md quotes the output.

Run: .venv/bin/python benchmarks/plan_speed.py
"""

from __future__ import annotations

import time

from gigafactory.models.presets import get_preset
from gigafactory.plan.calibration import SEQ_LEN, TABLE1
from gigafactory.plan.cost import estimate
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.layout import MEGATRON_SC21, MODERN
from gigafactory.plan.search import SearchSpace, search
from gigafactory.plan.validation import CASES, price
from gigafactory.plan.workload import from_model_config


def _layout(lay) -> str:
    parts = [f"{k} {getattr(lay, k)}" for k in ("tp", "cp", "pp", "ep") if getattr(lay, k) > 1]
    data = f"dp {lay.dp}" + (f" zero-{lay.zero}" if lay.sharded else " ddp")
    return ", ".join(parts + [data, f"{lay.schedule}" + (f" v{lay.virtual_stages}" if lay.virtual_stages > 1 else ""),
                              f"m {lay.microbatches}", f"ac {lay.checkpointing}", lay.precision])


def main() -> None:
    print("Calibration: Megatron-LM SC21 Table 1 (fits matmul_efficiency)\n")
    print("| params (B) | GPUs | t | p | published TFLOP/s | predicted | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for r in TABLE1:
        est = estimate(r.workload(), r.layout(), make_cluster("a100-80gb", r.gpus), MEGATRON_SC21, SEQ_LEN)
        err = est.tflops_per_gpu / r.tflops - 1
        errors.append(abs(err))
        print(f"| {r.params_b} | {r.gpus} | {r.tp} | {r.pp} | {r.tflops:.0f} | {est.tflops_per_gpu:.1f} | {err * 100:+.1f}% |")
    print(f"\nmean |error| {sum(errors) / len(errors) * 100:.1f}%, max {max(errors) * 100:.1f}%\n")

    print("Validation: published runs, never fitted\n")
    print("| run | source | layout as priced | metric | published | predicted | error | MFU full / causal |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for c in CASES:
        est, value = price(c)
        fmt = (lambda x: f"{x * 100:.1f}%") if c.metric == "mfu" else (lambda x: f"{x:,.0f}")
        print(f"| {c.name} | {c.source} | {_layout(est.layout)} | {c.metric} | {fmt(c.published)} | {fmt(value)} | "
              f"{(value / c.published - 1) * 100:+.1f}% | {est.mfu * 100:.1f}% / {est.mfu_causal * 100:.1f}% |")

    w = from_model_config(get_preset("grok-1"))
    print("\n| GPUs (h100) | search CPU time (s) | layouts priced | layout | step (s) | MFU |")
    print("|---:|---:|---:|---|---:|---:|")
    for n in (1024, 10_000, 100_000):
        start = time.process_time()
        best, priced = search(w, make_cluster("h100", n), MODERN, 8192, SearchSpace(global_batch=2048))
        elapsed = time.process_time() - start
        print(f"| {n:,} | {elapsed:.2f} | {priced} | {_layout(best[0].layout)} | {best[0].step_time_s:.3f} | {best[0].mfu * 100:.1f}% |")


if __name__ == "__main__":
    main()
