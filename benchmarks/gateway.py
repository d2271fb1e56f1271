"""Gateway benchmark: per-request overhead (direct to a replica vs through `gigafactory gateway`) and aggregate output
tokens/s through the gateway over 1, 2 and 3 `gigafactory serve` replicas.

Every server is its own process on 127.0.0.1 (replicas with OMP_NUM_THREADS=1, so three replicas use three threads);
the gateway runs the CLI's own code path (`gigafactory gateway --config`). Overhead rounds alternate direct and
gateway requests (non-streamed, max_tokens 1) so drift in machine load hits both alike.

    .venv/bin/python benchmarks/gateway.py                        # trains a tiny checkpoint in a temp dir
    .venv/bin/python benchmarks/gateway.py --checkpoint /tmp/run --clients 24 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from serve_load import tiny_checkpoint, wait_healthy  # noqa: E402  (the serve benchmark's checkpoint and wait)

GATEWAY_MAIN = ("import argparse, sys\nfrom gigafactory.cli import gateway\n"
                "p = argparse.ArgumentParser(); gateway.register(p.add_subparsers())\n"
                "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def processes(argvs: list[list[str]], env: dict):
    procs = [subprocess.Popen(a, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for a in argvs]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_toml(ports: list[int]) -> str:
    reps = "".join(f'[[replicas]]\nname = "r{i}"\nurl = "http://127.0.0.1:{p}"\nregion = "EU"\npool = "grok-tiny"\n'
                   for i, p in enumerate(ports))
    return f'default_region = "EU"\n[regions.EU]\nfallback = "grok-tiny"\n{reps}'


def gateway_argv(config: Path, port: int) -> list[str]:
    return [sys.executable, "-c", GATEWAY_MAIN, "gateway", "--config", str(config), "--port", str(port),
            "--log-level", "warning"]


async def overhead(direct: str, gateway: str, rounds: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 0}
    times = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(rounds + 5):
            for name, url in (("direct", direct), ("gateway", gateway))[:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                if i >= 5:  # warm-up rounds
                    times[name].append(time.perf_counter() - start)
    return {k: (statistics.median(v), sorted(v)[int(0.9 * len(v))]) for k, v in times.items()}


async def throughput(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    tokens, requests, errors = 0, 0, 0
    stop = time.perf_counter() + seconds

    async def worker(c: int, client: httpx.AsyncClient):
        nonlocal tokens, requests, errors
        i = 0
        while time.perf_counter() < stop:
            i += 1
            body = {"messages": [{"role": "user", "content": f"Tell me about day {c}-{i}."}], "max_tokens": max_tokens,
                    "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i,
                    "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-User-Id": f"u{c}"}) as r:
                if r.status_code != 200:
                    errors += 1
                    continue
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens += usage["completion_tokens"]
            requests += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(worker(c, client) for c in range(clients)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "requests": requests, "errors": errors, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="Checkpoint to serve (default: train a tiny one in a temp dir).")
    ap.add_argument("--replicas", type=int, default=3, help="Largest replica count measured (1..N).")
    ap.add_argument("--clients", type=int, default=24, help="Concurrent streaming clients in the throughput runs.")
    ap.add_argument("--seconds", type=float, default=10, help="Length of each throughput run.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=100, help="Overhead: requests each way.")
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    ckpt = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(tmp / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ports = [free_port() for _ in range(args.replicas)]
    serve = [[sys.executable, "-m", "gigafactory.cli.main", "serve", "--checkpoint", f"grok-tiny={ckpt}", "--port", str(p),
              "--slots", str(args.slots), "--log-level", "warning"] for p in ports]
    gw_ports = [free_port() for _ in ports]
    configs = []
    for n in range(1, args.replicas + 1):
        configs.append(tmp / f"gateway{n}.toml")
        configs[-1].write_text(gateway_toml(ports[:n]))
    load = os.getloadavg()[0]
    with processes(serve + [gateway_argv(c, p) for c, p in zip(configs, gw_ports)], env) as procs:
        for p, proc in zip(ports + gw_ports, procs):
            wait_healthy(f"http://127.0.0.1:{p}", proc)
        time.sleep(2)  # the gateways' first health checks
        direct, gw1 = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{gw_ports[0]}"
        o = asyncio.run(overhead(direct, gw1, args.rounds))
        added = (o["gateway"][0] - o["direct"][0]) * 1e3
        print(f"overhead ({args.rounds} non-streamed max_tokens=1 requests each way, alternating): direct p50 "
              f"{o['direct'][0] * 1e3:.1f} ms / p90 {o['direct'][1] * 1e3:.1f} ms; gateway p50 {o['gateway'][0] * 1e3:.1f} ms"
              f" / p90 {o['gateway'][1] * 1e3:.1f} ms; added p50 {added:.1f} ms")
        print(f"\n{args.clients} streaming clients, max_tokens {args.max_tokens}, {args.seconds:g} s each "
              f"(load average before: {load:.1f}, {os.cpu_count()} CPUs)")
        print("| path | replicas | requests | errors | output tok/s | × 1 replica | gateway CPU ms per 1k tokens |\n"
              "|---|---|---|---|---|---|---|")
        d = asyncio.run(throughput(direct, args.clients, args.seconds, args.max_tokens))
        print(f"| direct | 1 | {d['requests']} | {d['errors']} | {d['tokens_per_s']:.0f} | - | - |")
        base = None
        for n, (p, proc) in enumerate(zip(gw_ports, procs[len(ports):]), start=1):
            cpu = cpu_seconds(proc.pid)
            r = asyncio.run(throughput(f"http://127.0.0.1:{p}", args.clients, args.seconds, args.max_tokens))
            cpu = cpu_seconds(proc.pid) - cpu
            base = base or r["tokens_per_s"]
            print(f"| gateway | {n} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s'] / base:.2f}× | {cpu * 1e3 / max(1.0, r['tokens_per_s'] * r['wall_s'] / 1e3):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
