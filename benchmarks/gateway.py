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


async def throughput(urls: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed loop for `seconds`: client c streams requests to urls[c % len(urls)], one after another."""
    tokens, requests, errors, split = 0, 0, 0, {}
    stop = time.perf_counter() + seconds

    async def worker(c: int, client: httpx.AsyncClient):
        nonlocal tokens, requests, errors
        i = 0
        while time.perf_counter() < stop:
            i += 1
            body = {"messages": [{"role": "user", "content": f"Tell me about day {c}-{i}."}], "max_tokens": max_tokens,
                    "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i,
                    "stream_options": {"include_usage": True}}
            url = urls[c % len(urls)]
            try:
                async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                         headers={"X-User-Id": f"u{c}"}) as r:
                    if r.status_code != 200:
                        errors += 1
                        continue
                    replica = r.headers.get("x-gateway-replica", url.rsplit(":", 1)[1])
                    split[replica] = split.get(replica, 0) + 1
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage")
                            if usage:
                                tokens += usage["completion_tokens"]
                        elif line.startswith('data: {"error"'):
                            errors += 1
            except httpx.HTTPError:
                errors += 1
            requests += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(worker(c, client) for c in range(clients)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "requests": requests, "errors": errors, "wall_s": wall,
            "split": "/".join(str(split[k]) for k in sorted(split))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="Checkpoint to serve (default: train a tiny one in a temp dir).")
    ap.add_argument("--replicas", type=int, default=3, help="Largest replica count measured (1..N).")
    ap.add_argument("--clients", type=int, default=24, help="Concurrent streaming clients in the throughput runs.")
    ap.add_argument("--seconds", type=float, default=8, help="Length of each throughput run.")
    ap.add_argument("--repeats", type=int, default=2, help="Rounds over all configurations (the table shows each and the median).")
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
        for p in ports:  # every replica warm before anything is timed
            asyncio.run(throughput([f"http://127.0.0.1:{p}"], 4, 2, 8))
        direct, gw1 = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{gw_ports[0]}"
        o = asyncio.run(overhead(direct, gw1, args.rounds))
        added = (o["gateway"][0] - o["direct"][0]) * 1e3
        print(f"overhead ({args.rounds} non-streamed max_tokens=1 requests each way, alternating): direct p50 "
              f"{o['direct'][0] * 1e3:.1f} ms / p90 {o['direct'][1] * 1e3:.1f} ms; gateway p50 {o['gateway'][0] * 1e3:.1f} ms"
              f" / p90 {o['gateway'][1] * 1e3:.1f} ms; added p50 {added:.1f} ms")
        print(f"\n{args.clients} streaming clients, max_tokens {args.max_tokens}, {args.seconds:g} s each "
              f"(load average before: {load:.1f}, {os.cpu_count()} CPUs)")
        print("| path | replicas | requests (per replica), each round | errors | output tok/s, each round | median | "
              "× 1 replica, same path (medians) | gateway CPU ms per 1k tokens |\n|---|---|---|---|---|---|---|---|")
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        targets = [("direct", n, urls[:n], None) for n in range(1, len(ports) + 1)]  # clients split by hand: the control
        targets += [("gateway", n, [f"http://127.0.0.1:{p}"], proc) for n, (p, proc)
                    in enumerate(zip(gw_ports, procs[len(ports):]), start=1)]
        runs = {t[:2]: [] for t in targets}
        for _ in range(args.repeats):  # rounds interleave the configurations: machine load drifts over all alike
            for path, n, url, proc in targets:
                cpu = cpu_seconds(proc.pid) if proc else 0.0
                r = asyncio.run(throughput(url, args.clients, args.seconds, args.max_tokens))
                r["cpu_ms_per_1k"] = ((cpu_seconds(proc.pid) - cpu) * 1e3 / max(1.0, r["tokens_per_s"] * r["wall_s"] / 1e3)
                                      if proc else None)
                runs[(path, n)].append(r)
        for (path, n), rs in runs.items():
            med = statistics.median(r["tokens_per_s"] for r in rs)
            cpu = [r["cpu_ms_per_1k"] for r in rs if r["cpu_ms_per_1k"] is not None]
            requests = ", ".join(f"{r['requests']} ({r['split']})" for r in rs)
            rates = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            scale = f"{med / statistics.median(r['tokens_per_s'] for r in runs[(path, 1)]):.2f}×"
            cpu_text = f"{statistics.median(cpu):.0f}" if cpu else "-"
            print(f"| {path} | {n} | {requests} | {sum(r['errors'] for r in rs)} | {rates} | {med:.0f} | {scale} | {cpu_text} |")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
