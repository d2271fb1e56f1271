"""What one request costs a server outside the model: CPU milliseconds of the HTTP (front) process and of the whole
process tree per request, and the latency, for one client sending 1-token requests one after another. Ours and vLLM
on the same checkpoint, servers alternated over rounds (as in serve_vs_vllm.py, whose server commands this reuses).

With many streaming clients on a 2-core machine, the front process's CPU per request and per token is CPU that the
engine and the clients do not get, and requests that arrive together are taken in one after another: it bounds the
time to first token of a burst.

    .venv/bin/python benchmarks/serve_request_cost.py --checkpoint /tmp/mixtral --hf-dir /tmp/mixtral-hf
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serve_vs_vllm import (  # noqa: E402  (benchmarks/ is this script's own folder on sys.path)
    NAME, find_tokenizer, make_prompts, proc_stat, running_server, tree_cpu_seconds)


def process_cpu_seconds(pid: int) -> float:
    return proc_stat(Path(f"/proc/{pid}/stat"))[1]


def measure(url: str, pid: int, prompt: list[int], stream: bool, n: int) -> dict:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 1, "stream": stream, "temperature": 0.8, "seed": 1}
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(20):  # warm-up
            client.post("/v1/completions", json=body).raise_for_status()
        front, tree = process_cpu_seconds(pid), tree_cpu_seconds(pid)
        for _ in range(n):
            start = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            latencies.append(time.perf_counter() - start)
    return {"front_ms": 1e3 * (process_cpu_seconds(pid) - front) / n, "tree_ms": 1e3 * (tree_cpu_seconds(pid) - tree) / n,
            "latency_ms": 1e3 * statistics.median(latencies)}


def run_server(kind: str, args, prompt: list[int]) -> dict[bool, dict]:
    with running_server(kind, args, log_name="serve_request_cost") as (url, pid):
        return {stream: measure(url, pid, prompt, stream, args.requests) for stream in (False, True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="Our run directory (a mixtral-tiny checkpoint).")
    ap.add_argument("--hf-dir", help="Its hf-mixtral export, for vLLM (needed with vllm in --servers).")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--servers", default="ours,vllm", help="Comma-separated: ours, thread, vllm.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200, help="Measured requests per server, round and mode.")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--serve-args", default="", help="More `gigafactory serve` flags for ours.")
    args = ap.parse_args()
    kinds = args.servers.split(",")
    if "vllm" in kinds and not args.hf_dir:
        raise SystemExit("--hf-dir is required for vllm: export one with `gigafactory export --format hf-mixtral`")
    prompt = make_prompts(find_tokenizer(args.checkpoint), 0, 1)[0]
    results: dict[str, list[dict[bool, dict]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            results[kind].append(run_server(kind, args, prompt))
            for stream, m in results[kind][-1].items():
                print(f"round {r + 1} {kind:6s} stream={stream!s:5s}: front {m['front_ms']:.2f} ms CPU/request, "
                      f"tree {m['tree_ms']:.2f}, latency p50 {m['latency_ms']:.2f} ms", flush=True)
    print(f"\n{len(prompt)}-token prompt, max_tokens 1, {args.requests} requests one after another, median of "
          f"{args.rounds} rounds\n")
    print("| server | streamed | front process CPU ms/request | process tree CPU ms/request | latency p50 (ms) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        for stream in (False, True):
            cells = [statistics.median(r[stream][key] for r in results[kind])
                     for key in ("front_ms", "tree_ms", "latency_ms")]
            print(f"| {kind} | {'yes' if stream else 'no'} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
