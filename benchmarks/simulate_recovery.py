"""Job restarts vs replica-group recovery (torchft) with the shipped failure rates: ETTR side by side, and the plot.

    .venv/bin/python benchmarks/simulate_recovery.py [--gpus 100000] [--days 90] [--seeds 5] [--out benchmarks/simulate_recovery.png]

Prints a markdown table (ETTR mean +- std over seeds, the closed-form expectation, failures and job restarts per day,
where the time goes) for job-restart and replica at --gpus, plus the same with async checkpoints and in-memory
snapshots; then ETTR against cluster size for each (replica groups of 1,024 GPUs throughout: 2 groups at 2,048). Writes a PNG: ETTR vs GPUs, and where the lost time goes at --gpus (all rows; replica rows zoomed).
Every number comes from `simulate()` with the shipped defaults except the knobs named in each row.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gigafactory.simulate import ClusterSpec, JobSpec, RecoverySpec, SimConfig, SimSpec, simulate  # noqa: E402

VARIANTS = {  # label -> (recovery, job knobs)
    "job-restart": ("job-restart", {}),
    "replica": ("replica", {}),
    "replica + async checkpoints": ("replica", {"checkpoint_mode": "async"}),
    "replica + async + in-memory": ("replica", {"checkpoint_mode": "async", "in_memory_recovery": True}),
}
SHOWN = ("compute_lost", "degraded", "checkpoint", "reconfigure", "detect", "outage", "wait_for_nodes", "restart")
COLORS = {"compute_lost": "#98df8a", "degraded": "#c5b0d5", "checkpoint": "#7f7f7f",
          "reconfigure": "#bcbd22", "detect": "#ff7f0e", "outage": "#8c564b", "wait_for_nodes": "#d62728", "restart": "#1f77b4"}


def config(label: str, gpus: int, days: float, seeds: int) -> SimConfig:
    mode, job = VARIANTS[label]
    return SimConfig(cluster=ClusterSpec(gpus=gpus), job=JobSpec(**job), sim=SimSpec(days=days, seeds=seeds),
                     recovery=RecoverySpec(recovery=mode))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", default="2048,10000,30000,100000,300000")
    parser.add_argument("--out", default="benchmarks/simulate_recovery.png")
    args = parser.parse_args()

    results = {label: simulate(config(label, args.gpus, args.days, args.seeds)).to_dict() for label in VARIANTS}
    print(f"{args.gpus:,} GPUs, {args.days:g} days, {args.seeds} seeds, shipped failure rates\n")
    print("| recovery | ETTR | expected | failures/day | job restarts/day | checkpoint interval | " + " | ".join(SHOWN) + " |")
    print("|---" * (6 + len(SHOWN)) + "|")
    for label, d in results.items():
        frac = d["time_fraction"]
        print(f"| {label} | {d['ettr']:.4f} ± {d['ettr_std']:.4f} | {d['expected']['ettr']:.4f} | {d['failures'] / args.days:.1f} | "
              f"{d['job_restarts'] / args.days:.2f} | {d['inputs']['checkpoint_interval_s'] / 60:.0f} min | "
              + " | ".join(f"{100 * frac[s]:.2f}%" for s in SHOWN) + " |")

    sizes = [int(float(x)) for x in args.sizes.split(",")]
    curves = {label: [simulate(config(label, n, args.days, args.seeds)).ettr()[0] for n in sizes] for label in list(VARIANTS)[:3]}
    print("\n| GPUs | " + " | ".join(curves) + " |\n|---" + "|---" * len(curves) + "|")
    for i, n in enumerate(sizes):
        print(f"| {n:,} | " + " | ".join(f"{curves[k][i]:.3f}" for k in curves) + " |")

    fig, (ax, *panels) = plt.subplots(1, 3, figsize=(14, 4.4), width_ratios=(1, 1, 1))
    for label, ys in curves.items():
        ax.plot(sizes, ys, "o-", label=label)
    ax.axhline(0.95, color="black", ls=":", lw=0.8, label="0.95")
    ax.set_xscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("ETTR")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"ETTR vs cluster size ({args.days:g} days, {args.seeds} seeds)", fontsize=10)
    for bars, labels, title in ((panels[0], list(results), "all"), (panels[1], [k for k in results if k != "job-restart"], "replica, zoomed")):
        for i, label in enumerate(labels):
            left = 0.0
            for state in SHOWN:
                width = results[label]["time_fraction"][state]
                bars.barh(i, width, left=left, color=COLORS[state], label=state if i == 0 else None)
                left += width
            bars.text(left, i, f" 1 - ETTR = {1 - results[label]['ettr']:.3f}", va="center", fontsize=7)
        bars.set_yticks(range(len(labels)), [k.replace(" + ", "\n+ ") for k in labels], fontsize=7)
        bars.invert_yaxis()
        bars.set_xlim(0, 1.6 * max(1 - results[k]["ettr"] for k in labels))
        bars.set_xlabel(f"wall time lost, {args.gpus:,} GPUs ({title})", fontsize=8)
    panels[0].legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.9, -0.18), frameon=False)
    fig.subplots_adjust(left=0.05, right=0.97, top=0.92, bottom=0.27, wspace=0.42)
    fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
