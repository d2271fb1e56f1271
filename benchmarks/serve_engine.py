"""The serve engine alone (no HTTP): N requests submitted at once, stepped to completion in this thread; CPU
milliseconds per generated token (process time, which the machine's other load barely changes), tokens/s and TTFT.

`--before REV` runs the same scenarios on this repository's engine at git revision REV too (`git archive`d into a
temp dir, run in a subprocess), alternating, for a before/after table.

    .venv/bin/python benchmarks/serve_engine.py --checkpoint /tmp/mixtral --before 585d563
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"1 client": (1, 0, 64), "8 clients": (8, 0, 64), "32 clients": (32, 0, 64),
             "32 clients, shared 200-token prompt": (32, 200, 32)}  # (requests, shared prefix tokens, new tokens)


def measure(checkpoint: str, n: int, shared: int, new_tokens: int, threads: int) -> dict:
    """One scenario in this process (whichever gigafactory is on sys.path): a warm-up run, then the measured one."""
    import torch

    from gigafactory.inference.generate import load_for_inference
    from gigafactory.inference.sampling import SamplingParams
    from gigafactory.serve.engine import Engine

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    loaded = load_for_inference(checkpoint)
    tok = loaded.tokenizer
    system = []
    while len(system) < shared:
        system += tok.encode("In the beginning God created the heaven and the earth. And the earth was without form. ").ids
    prompts = [system[:shared] + tok.encode(f"Tell me about day {i} of creation, and of the light.").ids for i in range(n)]

    def run() -> dict:
        engine = Engine(loaded.model, tok, "bench", n_slots=32)
        seqs = [engine.submit(p, SamplingParams(temperature=0.8, max_tokens=new_tokens), lambda text, fin: None,
                              seed=i, ignore_eos=True) for i, p in enumerate(prompts)]
        while not engine._inbox.empty():
            engine.scheduler.add(engine._inbox.get_nowait())
        cpu, wall, steps = time.process_time(), time.perf_counter(), 0
        while not engine.scheduler.idle:
            engine.step()
            steps += 1
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tokens = sum(len(s.output_ids) for s in seqs)
        return {"cpu_ms_per_token": 1e3 * cpu / tokens, "tok_s": tokens / wall, "steps": steps,
                "ttft_p50_ms": 1e3 * statistics.median(s.first_token_at - s.arrived for s in seqs)}

    run()
    return run()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--before", help="Also run the engine at this git revision.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU time is the work done).")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one scenario, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.checkpoint, *SCENARIOS[args.one], args.threads)))
        return 0
    trees = {"now": ROOT}
    if args.before:
        trees["before"] = Path(tempfile.mkdtemp()) / "before"
        trees["before"].mkdir()
        archive = subprocess.run(["git", "archive", args.before, "gigafactory"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(trees["before"])], input=archive.stdout, check=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for scenario in SCENARIOS:
            for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--one", scenario,
                                      "--threads", str(args.threads)], env=env, cwd=tree, check=True,
                                     capture_output=True, text=True)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((scenario, name), []).append(m)
                print(f"round {r + 1} {name:6s} {scenario:38s} {m['cpu_ms_per_token']:5.2f} CPU ms/token "
                      f"{m['tok_s']:6.0f} tok/s  TTFT p50 {m['ttft_p50_ms']:6.0f} ms  {m['steps']} steps", flush=True)
    print(f"\nengine only, {args.threads} torch thread(s), best of {args.rounds} rounds\n")
    print("| scenario | " + " | ".join(f"{n} CPU ms/token | {n} tok/s | {n} TTFT p50 (ms)" for n in trees) + " |")
    print("|---" * (1 + 3 * len(trees)) + "|")
    for scenario in SCENARIOS:
        cells = []
        for name in trees:
            runs = results[(scenario, name)]
            cells.append(f"{min(m['cpu_ms_per_token'] for m in runs):.2f} | {max(m['tok_s'] for m in runs):.0f} | "
                         f"{min(m['ttft_p50_ms'] for m in runs):.0f}")
        print(f"| {scenario} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
