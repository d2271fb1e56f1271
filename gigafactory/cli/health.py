"""`gigafactory health`: pre-flight check of every accelerator, link, disk and host a job will use.

Run on the job's nodes before the job (and between restarts): under torchrun every rank measures itself, rank 0
judges all of them against the fleet's median and writes a JSON report with `bad_nodes` (the file `gigafactory
launch --exclude` reads). `--nproc N` starts the N ranks on this machine under torchrun. Exit 0: every node healthy;
1: some node is bad (report written); 2: bad input. Under a torchrun started by someone else every rank exits 0 and
the report is the answer (torchrun would print a failure traceback for a non-zero rank).

`--pick N --reports DIR --candidates a,b,c` measures nothing: it reads the per-node reports a job's pre-step wrote
(DIR/<node>.json), judges all their ranks together against the fleet median, drops failed, missing and
`--bad-nodes` nodes, and prints the first N healthy nodes, comma-separated (exit 1 if fewer; fleet/select.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gigafactory.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "health", help="Pre-flight node health: compute, memory, numerics, interconnect, storage; flags bad nodes.",
        description="Measure every rank (run it under torchrun on the job's nodes, or with --nproc on this machine) "
                    "and judge each against the fleet median; write a JSON report with bad_nodes.",
    )
    p.add_argument("--nproc", type=int, default=1, help="Ranks on this machine (torchrun); under torchrun already, ignored.")
    p.add_argument("--out", default="health.json", help="Where rank 0 writes the JSON report (bad_nodes is the exclude list).")
    p.add_argument("--storage-dir", default=".", help="Directory whose write/read speed is measured (the run/checkpoint storage).")
    p.add_argument("--slow-ratio", type=float, default=0.8, help="A rank whose throughput metric is below this x the fleet median is bad.")
    p.add_argument("--node-name", default="", help="Name of this node in the report (default: SLURMD_NODENAME, NODE_NAME on Kubernetes, else the hostname).")
    p.add_argument("--size", choices=("quick", "full"), default="quick", help="quick: CPU-sized probes; full: GPU-sized ones.")
    p.add_argument("--pick", type=int, default=0, metavar="N", help="Select N healthy nodes from the per-node reports in --reports (a job's pre-step); prints them comma-separated.")
    p.add_argument("--reports", metavar="DIR", help="--pick: directory of per-node reports, <node>.json each.")
    p.add_argument("--candidates", default="", help="--pick: the allocated nodes, comma-separated, in the order to fill from.")
    p.add_argument("--bad-nodes", metavar="FILE", help="--pick: a bad-nodes JSON (e.g. RUN_DIR/bad_nodes.json from straggler hunting) whose nodes are dropped; absent = none.")
    p.add_argument("--slow-rank", type=int, default=-1, help=argparse.SUPPRESS)  # drills: this rank's matmul looks slower
    p.add_argument("--slow-factor", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc} must be >= 1")
    if not 0 < args.slow_ratio <= 1:
        raise UserError(f"--slow-ratio={args.slow_ratio} must be in (0, 1]")
    if not args.slow_factor >= 1:
        raise UserError(f"--slow-factor={args.slow_factor} must be >= 1")
    out = Path(args.out)
    if out.is_dir() or not out.name:
        raise UserError(f"--out '{args.out}' is a directory; give a file path such as health.json")
    storage = Path(args.storage_dir)
    if storage.exists() and not storage.is_dir():
        raise UserError(f"--storage-dir '{args.storage_dir}' is a file; give the directory whose speed is to be measured")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.pick:
        return _pick(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = _without_nproc(sys.argv[sys.argv.index("health") + 1 :])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "gigafactory.cli.main", "health", *argv]
        code = subprocess.run(cmd).returncode
        if code:
            return code
        return 1 if json.loads(Path(args.out).read_text())["bad_nodes"] else 0
    return _measure_and_report(args)


def _pick(args: argparse.Namespace) -> int:
    from gigafactory.fleet.select import PickError, pick_nodes

    if not args.reports:
        raise UserError("--pick needs --reports DIR (the per-node reports of the pre-step)")
    candidates = [c for c in args.candidates.split(",") if c]
    try:
        result, code = pick_nodes(candidates, Path(args.reports), args.pick, args.slow_ratio, Path(args.bad_nodes) if args.bad_nodes else None), 0
    except PickError as err:
        result, code = err.result, 1
        print(f"error: {err}", file=sys.stderr)
    for node, reasons in result["dropped"].items():
        print(f"health: dropped {node}: " + "; ".join(reasons[:3]), file=sys.stderr)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"cannot write the report to '{args.out}' ({err.strerror or err}); pass a writable --out") from None
    if code == 0:
        print(f"health: training on {', '.join(result['chosen'])}" + (f"; spares left: {', '.join(result['spare_left'])}" if result["spare_left"] else ""), file=sys.stderr)
        print(",".join(result["chosen"]))
    return code


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _measure_and_report(args: argparse.Namespace) -> int:
    import torch

    from gigafactory.fleet.health import ProbeSizes, judge, measure
    from gigafactory.parallel.distributed import all_gather_objects, destroy_distributed, get_rank, init_distributed
    from gigafactory.resilience.stragglers import node_name

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type, timeout_s=300.0)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    sizes = ProbeSizes() if args.size == "quick" else ProbeSizes(matmul_n=8192, memory_mib=2048, comm_mib=256, storage_mib=1024)
    rank = get_rank()
    slow = args.slow_factor if rank == args.slow_rank else 1.0
    mine = measure(device, Path(args.storage_dir).expanduser(), sizes, args.node_name or node_name(), slow)
    everyone = all_gather_objects(mine)
    destroy_distributed()
    if rank != 0:
        return 0
    report = judge(everyone, args.slow_ratio)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a job's pre-step writes RUN_DIR/health/<node>.json
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"cannot write the report to '{args.out}' ({err.strerror or err}); pass a writable --out") from None
    for r in report["ranks"]:
        storage = f", storage w/r {r['storage_write_mbps']:.0f}/{r['storage_read_mbps']:.0f} MB/s" if "storage_write_mbps" in r else ""
        print(f"rank {r['rank']} ({r['node']}): {r['verdict']}  matmul {r.get('matmul_tflops', 0):.3g} TFLOP/s, "
              f"memory {r.get('memory_gbps', 0):.3g} GB/s{storage}" + "".join(f"\n    {why}" for why in r["reasons"]))
    for name, node in report["nodes"].items():
        if node["verdict"] == "bad" and not any(why.startswith("rank ") for why in node["reasons"][:1]):
            print(f"node {name}: bad" + "".join(f"\n    {why}" for why in node["reasons"]))
    bad = report["bad_nodes"]
    print(f"{len(report['nodes'])} node(s), {len(bad)} bad{': ' + ', '.join(bad) if bad else ''}; report: {args.out}")
    return 1 if bad and "WORLD_SIZE" not in os.environ else 0  # under torchrun the report says it (no agent traceback)
