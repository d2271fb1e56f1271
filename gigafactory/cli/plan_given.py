"""`gigafactory plan --layout ...` (or a `[parallel]` table in the --model TOML): price exactly that layout next
to the search's best on the same cluster, and say how far apart they are."""

from __future__ import annotations

import math

from gigafactory.errors import UserError


def given_rows(args, w, catalog, gpu: str, network, overrides: dict, seq: int, space, parallel_table, batch_size: int,
               name: str, counts: list[int]):
    """Rows for the given layout and the search's best; `counts` = the GPU counts the user gave (none: its size)."""
    from gigafactory.plan.cost import estimate
    from gigafactory.plan.forecast import forecast
    from gigafactory.plan.given import (
        build_layout, check_layout, describe_distance, distance, fit_verdict, from_trainer_table, parse_degrees,
        parse_stage_layers,
    )
    from gigafactory.plan.hardware import make_cluster
    from gigafactory.plan.layout import MODERN
    from gigafactory.plan.reliability import with_failures
    from gigafactory.plan.report import row
    from gigafactory.plan.search import search

    node = catalog.gpus[gpu].gpus_per_node if gpu in catalog.gpus else 8
    if len(counts) > 1:
        raise UserError("--layout prices one cluster: give one --gpus count (or none: the layout's own size)")
    if args.layout is not None:
        lay = build_layout(parse_degrees(args.layout), microbatch_size=args.microbatch, microbatches=args.microbatches,
                           schedule=args.schedule, zero=args.zero, checkpointing=args.checkpointing,
                           precision=args.precision, reduce_dtype=args.reduce_dtype,
                           stage_layers=parse_stage_layers(args.stage_layers) if args.stage_layers else (),
                           batch_sequences=space.global_batch)
    else:
        if not counts:
            raise UserError("a [parallel] table is priced on --gpus N (its dp_shard = -1 needs the world size)")
        lay = from_trainer_table(parallel_table, batch_size, counts[0])
    n = counts[0] if counts else math.ceil(lay.world / node) * node
    cluster = make_cluster(gpu, n, network=network, catalog=catalog, **overrides)
    check_layout(w, lay, seq, n)
    est = estimate(w, lay, cluster, MODERN, seq)
    verdict = fit_verdict(est, cluster.gpu.hbm_gb)
    if verdict:
        raise UserError(f"layout {args.layout or '[parallel]'} {verdict}")
    rows = []
    best, priced = search(w, cluster, MODERN, seq, space)
    for label, chosen in (("given layout", est), ("search's best", best[0])):
        fc = forecast(chosen, w, cluster, args.tokens)
        rows.append(row(chosen, fc, cluster, priced if chosen is best[0] else 1,
                        with_failures(chosen, fc, w, cluster, args.recovery), w))
        rows[-1]["label"] = f"{label} ({n:,} x {gpu})"
    d = distance(est, best[0])
    rows[0]["given_vs_search"] = d
    rows[0]["distance_text"] = describe_distance(d)
    title = (f"{name} on {gpu}: {args.tokens:.3g} tokens, seq {seq}, target batch {args.batch_tokens / 1e6:.1f}M tokens, "
             f"recovery {args.recovery}")
    return rows, title
