"""Time `gigafactory plan`'s search (grok-1 on 1k..100k H100) and print the Megatron Table 1 calibration.

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
from gigafactory.plan.workload import from_model_config


def main() -> None:
    print("| params (B) | GPUs | t | p | published TFLOP/s | predicted | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for r in TABLE1:
        est = estimate(r.workload(), r.layout(), make_cluster("a100-80gb", r.gpus), MEGATRON_SC21, SEQ_LEN)
        err = est.tflops_per_gpu / r.tflops - 1
        errors.append(abs(err))
        print(f"| {r.params_b} | {r.gpus} | {r.tp} | {r.pp} | {r.tflops:.0f} | {est.tflops_per_gpu:.1f} | {err * 100:+.1f}% |")
    print(f"\nmean |error| {sum(errors) / len(errors) * 100:.1f}%, max {max(errors) * 100:.1f}%\n")

    w = from_model_config(get_preset("grok-1"))
    print("| GPUs (h100) | search time (s) | layouts priced | layout | step (s) | MFU |")
    print("|---:|---:|---:|---|---:|---:|")
    for n in (1024, 10_000, 100_000):
        start = time.perf_counter()
        best, priced = search(w, make_cluster("h100", n), MODERN, 8192, SearchSpace(global_batch=2048))
        elapsed = time.perf_counter() - start
        b = best[0].layout
        desc = f"dp {b.dp_replicate}x{b.dp_shard} tp {b.tp} pp {b.pp} ep {b.ep} cp {b.cp} mbs {b.microbatch_size}x{b.microbatches} {b.schedule} ac={b.checkpointing}"
        print(f"| {n:,} | {elapsed:.2f} | {priced} | {desc} | {best[0].step_time_s:.3f} | {best[0].mfu * 100:.1f}% |")


if __name__ == "__main__":
    main()
