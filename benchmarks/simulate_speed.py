"""Time `gigafactory simulate` on 100,000 GPUs x 90 days with the shipped failure rates (target: < 10 s).

    .venv/bin/python benchmarks/simulate_speed.py [--gpus N] [--days D] [--repeat R]

Prints the best wall time of R runs of one seed (imports excluded), and the events simulated.
"""

from __future__ import annotations

import argparse
import platform
import time

from gigafactory.simulate import ClusterSpec, SimConfig, SimSpec, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cfg = SimConfig(cluster=ClusterSpec(gpus=args.gpus), sim=SimSpec(days=args.days))
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        report = simulate(cfg)
        times.append(time.perf_counter() - start)
    d = report.to_dict()
    print(f"simulate_speed: {args.gpus:,} GPUs x {args.days:g} days: best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s "
          f"over {args.repeat} runs ({d['interruptions']:.0f} interruptions, ETTR {d['ettr']:.4f}) "
          f"[{platform.python_implementation()} {platform.python_version()}, {platform.machine()}]")


if __name__ == "__main__":
    main()
