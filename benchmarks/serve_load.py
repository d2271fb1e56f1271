"""Load benchmark for `gigafactory serve`: N concurrent streaming clients on loopback vs. sequential generation.

Trains (or reuses) a tiny checkpoint, starts `gigafactory serve` as a separate process on a free port, then for each client count
sends `--requests-per-client` streaming chat requests per client and reports throughput (generated tokens/s), p50/p99
time to first token, errors, and the ratio to sequential generation (the same requests one at a time).

    .venv/bin/python benchmarks/serve_load.py                       # 8 and 32 clients
    .venv/bin/python benchmarks/serve_load.py --clients 8 --max-tokens 64 --checkpoint /tmp/srv_run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_checkpoint(run_dir: Path) -> Path:
    from gigafactory.config.loader import build_config
    from gigafactory.train.trainer import Trainer

    if not (run_dir / "checkpoints").is_dir():
        dotted = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
                  "model.n_kv_heads": 2, "model.max_seq_len": 256, "model.n_experts": 4, "model.top_k": 2,
                  "model.moe_ffn_dim": 64, "data.seq_len": 64, "data.cache_dir": str(run_dir.parent / "data"),
                  "training.steps": 4, "training.batch_size": 4, "training.eval_every": 0, "training.dtype": "fp32",
                  "logging.run_dir": str(run_dir), "logging.tensorboard": False, "logging.progress": False}
        Trainer(build_config({}, dotted)).train()
    return run_dir


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


async def stream_timed(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, int, bool]:
    """(time to the first generated text, completion tokens, ok) for one streamed request on /v1/completions or
    /v1/chat/completions (any OpenAI-compatible server: ours, vLLM, the gateway)."""
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return 0.0, 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            choice = (obj.get("choices") or [{}])[0]
            if ttft is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), tokens, True


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float, int, bool]:
    body = {"messages": [{"role": "user", "content": f"Tell me about day {i} of creation."}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i,
            "stream_options": {"include_usage": True}}
    return await stream_timed(client, "/v1/chat/completions", body)


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker(c: int):
            return [await one_request(client, c * per_client + k, max_tokens) for k in range(per_client)]
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results if r[2])
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "errors": sum(not r[2] for r in results), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="Checkpoint to serve (default: train a tiny one in a temp dir).")
    ap.add_argument("--clients", default="8,32", help="Comma-separated concurrent client counts.")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=32, help="KV-cache slots (the most requests decoded together).")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from tests.serve.conftest import free_port

    ckpt = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tempfile.mkdtemp()) / "run")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gigafactory.cli.main", "serve", "--checkpoint", f"grok-tiny={ckpt}",
                               "--port", str(port), "--slots", str(args.slots), "--device", args.device,
                               "--log-level", "warning"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        asyncio.run(load(url, 2, 1, 4))  # warm-up
        counts = [int(c) for c in args.clients.split(",")]
        seq = asyncio.run(load(url, 1, max(counts) * args.requests_per_client // 4 or 1, args.max_tokens))
        print(f"sequential: {seq['requests']} requests, {seq['tokens_per_s']:.0f} tok/s, "
              f"TTFT p50 {seq['ttft_p50_s'] * 1e3:.1f} ms")
        print("| clients | requests | errors | tokens | wall (s) | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | × sequential |")
        print("|---|---|---|---|---|---|---|---|---|")
        ok = seq["errors"] == 0
        for n in counts:
            r = asyncio.run(load(url, n, args.requests_per_client, args.max_tokens))
            ratio = r["tokens_per_s"] / seq["tokens_per_s"]
            print(f"| {n} | {r['requests']} | {r['errors']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['ttft_p50_s'] * 1e3:.1f} | {r['ttft_p99_s'] * 1e3:.1f} | {ratio:.1f}× |")
            ok &= r["errors"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
