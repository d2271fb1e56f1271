"""`gigafactory plan`: the best parallel layout for a model on each cluster size, and the run it implies."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from gigafactory.cli.paths import png_file
from gigafactory.errors import UserError

MAX_GPUS = 10_000_000  # 100x today's largest clusters: above it a count is a typo, and the cost model meaningless
DEFAULT_BATCH_TOKENS = 16 * 2**20  # Llama 3 405B's final batch (Dubey et al. 2024); change with --batch-tokens


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="Choose the parallel layout and forecast step time, MFU, memory, days, MW and $.",
        description="Search parallel layouts for a model on one or more cluster sizes and forecast the training run.",
    )
    p.add_argument("--model", default="grok-1", help="Model preset (grok-1, grok-2, ...) or a TOML config file with a [model] section.")
    p.add_argument("--gpus", default=None, help="Comma-separated GPU counts to compare, e.g. 1024,10000,100000 (default 10000,100000; "
                                               "with --layout: the layout's own size).")
    p.add_argument("--gpu", default=None, help="GPU from the catalog: a100-40gb, a100-80gb, h100, h800, h200, b200, gb200.")
    p.add_argument("--network", default=None, help="Scale-out network: ib-hdr, ib-ndr, spectrum-x (default: ib-hdr for A100, else ib-ndr).")
    p.add_argument("--cluster", metavar="FILE", help="TOML file adding [gpu.NAME] / [network.NAME] entries and an optional [cluster] table.")
    p.add_argument("--tokens", type=float, default=6e12, help="Training token budget (default 6e12).")
    p.add_argument("--seq-len", type=int, default=0, help="Sequence length; 0 = the model's max_seq_len.")
    p.add_argument("--batch-tokens", type=float, default=DEFAULT_BATCH_TOKENS, help="Target global batch in tokens (default 16M).")
    p.add_argument("--pue", type=float, default=None, help="Power usage effectiveness of the facility (default from the catalog).")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="Price of a GPU-hour (default from the catalog).")
    p.add_argument("--failures-per-gpu-day", type=float, default=None,
                   help="Job-interrupting failures per GPU per day; scales every shipped failure class (default from the catalog: 4.7e-4).")
    p.add_argument("--recovery", choices=("job-restart", "replica"), default="job-restart",
                   help="How failures are recovered: job-restart (torchrun restarts the job) or replica (torchft replica groups, "
                        "one per dp_replicate). Days, GPU-hours, energy and $ include its losses (docs/simulate.md).")
    p.add_argument("--sites", type=int, default=1, help="Split each cluster size over this many sites (replica groups) and price sync DP vs DiLoCo across them (docs/cross-site.md).")
    p.add_argument("--site-link", default="400Gbps,10ms", help="With --sites > 1: the link between sites as BANDWIDTH,LATENCY (default 400Gbps,10ms).")
    p.add_argument("--max-idle", type=float, default=0.05, help="Fraction of GPUs the layout may leave as spares (default 0.05).")
    g = p.add_argument_group("price a given layout (instead of only searching)")
    g.add_argument("--layout", help="Degrees to price exactly, e.g. tp=8,pp=16,cp=1,dp=64,ep=1 (also dp_replicate=, dp_shard= for HSDP, "
                                    "v= for interleaving). A [parallel] table in a --model TOML is priced the same way.")
    g.add_argument("--microbatch", type=int, default=1, help="With --layout: sequences per microbatch (default 1).")
    g.add_argument("--microbatches", type=int, default=0, help="With --layout: microbatches per step; 0 = as many as reach --batch-tokens.")
    g.add_argument("--schedule", default="1f1b", help="With --layout: gpipe, 1f1b, interleaved_1f1b, zero_bubble or dualpipe.")
    g.add_argument("--zero", type=int, default=1, help="With --layout: ZeRO stage over dp (0 = DDP, 1, 2, 3 = FSDP; default 1).")
    g.add_argument("--checkpointing", default="none", help="With --layout: activation checkpointing none, selective or full.")
    g.add_argument("--stage-layers", default="", help="With --layout: layers per pipeline stage, e.g. 3+4+4+3 (default: balanced by the planner).")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"), help="GEMM precision of the layers, searched and given (default bf16).")
    p.add_argument("--reduce-dtype", default="fp32", choices=("fp32", "bf16"), help="Gradient reduction dtype (default fp32).")
    p.add_argument("--json", action="store_true", help="Print a JSON list, one object per cluster size, instead of the table.")
    p.add_argument("--plot", metavar="PNG", type=png_file, help="Write a sweep plot (days, MFU, cost vs GPUs) to this PNG file.")
    p.set_defaults(func=run)


def _model(spec: str):
    """(ModelConfig, the planner's Workload, the TOML's [parallel] table and [training] batch_size when the model
    came from a file)."""
    from gigafactory.models.presets import PRESETS, get_preset
    from gigafactory.plan.workload import from_model_config

    if spec in PRESETS:
        cfg = get_preset(spec)
        cfg.validate()
        return cfg, from_model_config(cfg), None, 1
    if spec.endswith(".toml"):
        if not Path(spec).is_file():
            raise UserError(f"--model {spec!r}: file not found; pass a preset name or an existing TOML config")
        from gigafactory.plan.describe import read_model_toml

        cfg, w, raw = read_model_toml(spec)  # MLA, plain MLPs, shared experts, ... (plan/describe.py)
        cfg.model.validate()
        return cfg.model, w, raw.get("parallel"), cfg.training.batch_size
    raise UserError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a .toml config file")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(float(x)) for x in text.split(",") if x.strip()]
    except (ValueError, OverflowError):  # OverflowError: inf
        raise UserError(f"--gpus {text[:40]!r} must be comma-separated integers, e.g. 10000,100000") from None
    if not counts or any(c <= 0 for c in counts):
        raise UserError(f"--gpus {text!r} must list positive GPU counts, e.g. 10000,100000")
    if max(counts) > MAX_GPUS:
        raise UserError(f"--gpus {max(counts):.3g} is more than the {MAX_GPUS:,} GPUs the planner prices")
    return counts


def plan_rows(args) -> tuple[list[dict], str]:
    from gigafactory.plan.hardware import load_catalog, make_cluster
    from gigafactory.plan.layout import MODERN
    from gigafactory.plan.reliability import best_with_failures
    from gigafactory.plan.report import row
    from gigafactory.plan.search import SearchSpace, search

    args.gpus_given = args.gpus is not None
    args.gpus = args.gpus or "10000,100000"
    cfg, w, parallel_table, batch_size = _model(args.model)
    catalog = load_catalog(args.cluster)
    gpu = args.gpu or str(catalog.cluster.get("gpu", "h100"))
    network = args.network or catalog.cluster.get("network")
    seq = args.seq_len or cfg.max_seq_len
    if seq <= 0 or seq > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq} must be in 1..{cfg.max_seq_len} (the model's max_seq_len)")
    if not (math.isfinite(args.tokens) and args.tokens > 0) or not math.isfinite(args.batch_tokens) or args.batch_tokens < seq:
        raise UserError(f"--tokens must be a finite number > 0 and --batch-tokens a finite number >= one sequence ({seq} tokens)")
    for flag, value, low in (("--pue", args.pue, 1.0), ("--usd-per-gpu-hour", args.usd_per_gpu_hour, 0.0),
                             ("--failures-per-gpu-day", args.failures_per_gpu_day, 0.0)):
        if value is not None and not (math.isfinite(value) and value >= low):
            raise UserError(f"{flag} {value} must be a finite number >= {low:g}")
    if not 0 <= args.max_idle < 1:
        raise UserError(f"--max-idle {args.max_idle} must be in [0, 1)")
    if args.sites < 1:
        raise UserError(f"--sites {args.sites} must be >= 1")
    if args.sites > 1:
        from gigafactory.plan.sites import parse_link, price_sites

        link = parse_link(args.site_link)
    space = SearchSpace(global_batch=max(1, round(args.batch_tokens / seq)), max_idle=args.max_idle,
                        precision=args.precision, reduce_dtype=args.reduce_dtype, keep=30)
    overrides = dict(pue=args.pue, usd_per_gpu_hour=args.usd_per_gpu_hour, gpu_failures_per_day=args.failures_per_gpu_day)
    for key in ("pue", "usd_per_gpu_hour", "gpu_failures_per_day", "storage_write_gbps"):
        if overrides.get(key) is None and key in catalog.cluster:
            overrides[key] = float(catalog.cluster[key])  # load_catalog checked it is a finite number in range
    if args.precision == "fp8" and gpu in catalog.gpus and not catalog.gpus[gpu].fp8_tflops:
        raise UserError(f"--precision fp8: {gpu} has no fp8 tensor cores (fp8_tflops = 0 in the catalog)")
    if args.layout is not None or parallel_table is not None:
        from gigafactory.cli.plan_given import given_rows

        return given_rows(args, w, catalog, gpu, network, overrides, seq, space, parallel_table, batch_size, cfg.name,
                          _counts(args.gpus) if args.gpus_given else [])
    rows = []
    for n in _counts(args.gpus):
        cluster = make_cluster(gpu, n, network=network, catalog=catalog, **overrides)
        best, priced = search(w, cluster, MODERN, seq, space)
        chosen, fc, failures = best_with_failures(best, w, cluster, args.tokens, args.recovery)
        rows.append(row(chosen, fc, cluster, priced, failures, w))
        if args.sites > 1:  # each site plans its own share; the sites' batches add up
            if n < args.sites:
                raise UserError(f"--gpus {n} cannot be split over --sites {args.sites}")
            site_space = SearchSpace(global_batch=max(1, round(args.batch_tokens / seq / args.sites)), max_idle=args.max_idle)  # same global batch
            site_best, _ = search(w, make_cluster(gpu, n // args.sites, network=network, catalog=catalog, **overrides), MODERN, seq, site_space)
            rows[-1]["sites"] = price_sites(site_best[0].step_time_s, site_best[0].tokens_per_step, w.params_total, args.sites,
                                            n, args.tokens, cluster.usd_per_gpu_hour, *link)
    title = (f"{cfg.name} on {gpu}: {args.tokens:.3g} tokens, seq {seq}, target batch {args.batch_tokens / 1e6:.1f}M tokens, "
             f"recovery {args.recovery}")
    return rows, title


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows, title = plan_rows(args)
    if args.plot:
        from gigafactory.plan.report import plot

        plot(rows, args.plot, title)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from gigafactory.plan.report import render_table

    render_table(rows, title)
    if args.sites > 1:
        from gigafactory.plan.sites import render

        for r in rows:
            render(r["sites"], f"{r['gpus']:,} GPUs as {args.sites} sites x {r['gpus'] // args.sites:,}, link {args.site_link} "
                               "(failure losses not included)")
    for r in rows:
        if r.get("distance_text"):
            print(f"\n{r['label']}: {r['distance_text']}")
    best = rows[-1]
    print(f"\n# parallel layout for {best['gpus']:,} GPUs (paste into the training config):")
    print(best["parallel_toml"])
    print(f"planned in {time.perf_counter() - start:.2f} s" + (f"; plot written to {args.plot}" if args.plot else ""))
    return 0
