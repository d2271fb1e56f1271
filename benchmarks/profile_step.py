"""Profile one training step (forward, backward, clipping, AdamW) with torch.profiler; print the top ops.

The step is the trainer's: the model's loss (fused head loss on CPU), clip_grad_norm_ and AdamW, then the one
batched host read (train/host_reads.py). Ops are ranked by self time, so a sync or a Python-side overhead shows
as what it costs, not hidden inside its caller. docs/benchmarks.md ("Training step profile") has the results.

    .venv/bin/python benchmarks/profile_step.py --preset grok-tiny --batch 4 --seq 256
    .venv/bin/python benchmarks/profile_step.py --preset grok-1b-moe --layers 2 --batch 1 --seq 256
    python3 benchmarks/profile_step.py --device cuda --preset grok-1b-moe --batch 4 --seq 2048 --trace step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from gigafactory.models import GrokModel, get_preset
from gigafactory.train.host_reads import read_scalars, sum_on_device
from gigafactory.train.optim import clip_grad_norm_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="grok-tiny")
    parser.add_argument("--layers", type=int, default=0, help="Override n_layers (0: the preset's); per-layer shapes stay real.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=("bf16", "fp32"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=3, help="Timed steps after the profiled one (median reported).")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trace", default="", help="Also write a Chrome trace of the profiled step to this file.")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    model = GrokModel(cfg).to(args.device)
    model.init_weights(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    params = list(model.parameters())

    def step() -> list[float]:
        with autocast:
            loss = model(inputs, targets_BS=targets)
        loss.backward()
        grad_norm = clip_grad_norm_(params, 1.0)
        values = read_scalars(loss.detach().double(), grad_norm, sum_on_device([m.last_aux_loss for m in model.moe_layers()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return values

    step()  # warm-up: allocations, AdamW state
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    times, cpu_times = [], []  # CPU time (all threads) is steadier than wall time on a shared machine
    for _ in range(args.steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(f"{args.preset} {cfg.n_layers}L d{cfg.d_model} E{cfg.n_experts} top{cfg.top_k} F{cfg.moe_ffn_dim} V{cfg.vocab_size}, "
          f"batch {args.batch} x seq {args.seq}, {args.dtype}, {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    median = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    print(f"median step {median(times):.0f} ms wall, {median(cpu_times):.0f} ms CPU (process) over {len(times)} steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=40))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
