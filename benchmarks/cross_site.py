"""Two sites over a simulated slow link: synchronous data parallelism (ddp) vs DiLoCo every H steps, measured here.

Runs `gigafactory train --nproc 2 --fault_tolerance.enabled true` (two replica groups of one process each, gloo; each
group is a "site") with the grok-tiny architecture on the shipped corpus, the same steps and tokens for every mode,
and a link of `--link-ms` latency and `--link-gbps` bandwidth injected into every cross-group transfer
(fault_tolerance.link_delay_ms / link_gbps: a sleep of latency + bytes / bandwidth after the real allreduce). Reports
per mode: held-out loss at equal steps (= equal tokens), bytes each site sent across the link, the time the link
cost, and tokens/s of both sites together; writes a table (JSON lines) and docs/cross-site.png.

    python benchmarks/cross_site.py --steps 256   # ~25 minutes on 2 loaded CPU cores (the docs' table)
    python benchmarks/cross_site.py --modes ddp,"diloco H=8"   # a subset
    python benchmarks/cross_site.py --from OUT    # table and plot again from saved output
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"ddp": ["--fault_tolerance.sync=ddp"]} | {
    f"diloco H={h}": ["--fault_tolerance.sync=diloco", f"--fault_tolerance.sync_every={h}"] for h in (1, 8, 32, 128)} | {
    "diloco H=32 bf16": ["--fault_tolerance.sync=diloco", "--fault_tolerance.sync_every=32", "--fault_tolerance.compression=bf16"],
    "streaming H=32 F=4": ["--fault_tolerance.sync=streaming_diloco", "--fault_tolerance.sync_every=32", "--fault_tolerance.fragments=4"],
}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(name: str, extra: list[str], root: Path, args) -> dict:
    out = root / name.replace(" ", "_").replace("=", "")
    cmd = [sys.executable, "-m", "gigafactory.cli.main", "train", "--nproc=2", "--fault_tolerance.enabled=true", *extra,
           f"--fault_tolerance.link_delay_ms={args.link_ms}", f"--fault_tolerance.link_gbps={args.link_gbps}",
           f"--data.seq_len={args.seq_len}", f"--training.batch_size={args.batch_size}", f"--training.steps={args.steps}",
           f"--training.eval_every={args.steps // 4}", "--training.eval_batches=16", "--training.dtype=fp32", "--training.threads=1",
           "--optimizer.warmup_steps=8", "--checkpoint.every=0", f"--logging.run_dir={out}", "--logging.progress=false",
           "--logging.tensorboard=false", "--logging.log_every=1", "--resilience.straggler_every=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    recs = read(out / "group0" / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    link = [e for g in (0, 1) for e in read(out / f"group{g}" / "events.jsonl") if e["event"] == "ft_link"]
    group_tokens = args.batch_size * args.seq_len
    step_s = sum(r["step_time"] for r in steps) / len(steps)
    return {"mode": name, "steps": len(steps), "tokens": 2 * group_tokens * len(steps), "eval_loss": round(evals[-1][1], 4),
            "evals": evals, "bytes_sent_per_site_MB": round(max(e["bytes_sent"] for e in link) / 1e6, 1),
            "transfers": max(e["transfers"] for e in link), "link_wait_s": max(e["link_wait_s"] for e in link),
            "step_s": round(step_s, 3), "tokens_per_s": round(2 * group_tokens / step_s, 1)}


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(rows):
        steps, losses = zip(*r["evals"])
        a.plot(steps, losses, marker="o", label=r["mode"])
        b.scatter(r["bytes_sent_per_site_MB"], r["eval_loss"], s=40)
        b.annotate(f"{r['mode']}\n{r['tokens_per_s']:.0f} tok/s", (r["bytes_sent_per_site_MB"], r["eval_loss"]), fontsize=8,
                   xytext=(-4, -24) if i % 2 else (4, 4), textcoords="offset points", ha="right" if i % 2 else "left")  # neighbours apart
    a.set(xlabel="step (equal tokens across modes)", ylabel="held-out loss", title="2 sites, grok-tiny, shipped corpus")
    a.legend()
    b.set(xscale="log", xlabel="MB each site sent across the link", ylabel=f"held-out loss at step {rows[0]['steps']}",
          title=f"simulated link {args.link_ms:g} ms, {args.link_gbps:g} Gbit/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--link-ms", type=float, default=10.0)
    ap.add_argument("--link-gbps", type=float, default=1.0)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--from", dest="saved", default="", help="a table this script printed before: plot it again")
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "cross-site.png"))
    args = ap.parse_args()
    if args.saved:
        rows = [json.loads(line) for line in Path(args.saved).read_text().splitlines() if line.startswith("{")]
    else:
        root = Path(args.out or tempfile.mkdtemp(prefix="cross-site-"))
        rows = []
        for name in args.modes.split(","):
            if name not in MODES:
                sys.exit(f"unknown mode {name!r}; choose from: {', '.join(MODES)}")
            rows.append(run(name, MODES[name], root, args))
            print(json.dumps(rows[-1]), flush=True)
    plot(rows, Path(args.plot), args)
    print(f"\n| mode | held-out loss @ step {rows[0]['steps']} | MB sent per site | link wait s | tokens/s (2 sites) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['eval_loss']:.4f} | {r['bytes_sent_per_site_MB']:.1f} | {r['link_wait_s']:.1f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
