"""For real: three `gigafactory serve` processes on 127.0.0.1 behind the gateway. Routing keeps a shared system prompt
on one replica (whose prefix cache then serves it) and a user on one replica; one replica is SIGKILLed under load: no 5xx for any request that had not started
streaming, a stream cut off mid-way ends with one clean error event and [DONE], nothing hangs, the replica leaves
the pool at once and the rest of the load is served by the other two."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gigafactory.gateway.app import Gateway, create_app
from gigafactory.gateway.config import parse_config
from tests.serve.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def fleet_config(ports: list[int]) -> str:
    replicas = "".join(f'[[replicas]]\nname = "r{i}"\nurl = "http://127.0.0.1:{p}"\nregion = "EU"\npool = "grok-tiny"\n'
                       for i, p in enumerate(ports))
    return f"""
default_region = "EU"
[health]
interval_s = 0.5
timeout_s = 2
[routing]
read_timeout_s = 30
[regions.EU]
fallback = "grok-tiny"
{replicas}"""


@contextlib.contextmanager
def serve_replicas(run_dir, n: int):
    ports = [free_port() for _ in range(n)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "gigafactory.cli.main", "serve", "--checkpoint", str(run_dir),
                               "--port", str(p), "--slots", "8", "--log-level", "warning"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in ports]
    try:
        deadline = time.monotonic() + 120
        for proc, port in zip(procs, ports):
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "replica did not become ready"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
        yield procs, ports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def running_gateway(gw: Gateway):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="warning", http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chat(content: str, system: str | None = None, stream: bool = False, max_tokens: int = 8) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"messages": messages, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True, "temperature": 0}


async def one(client: httpx.AsyncClient, body: dict, user: str) -> tuple[int, str, list]:
    """(status, replica, events): a stream's events are its parsed data lines (the final "[DONE]" kept as a str)."""
    headers = {"X-User-Id": user}
    if not body["stream"]:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        return r.status_code, r.headers.get("x-gateway-replica", ""), [r.json()]
    events = []
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
        return r.status_code, r.headers.get("x-gateway-replica", ""), events


def test_three_replicas_affinity_and_a_replica_killed_under_load(fleet_checkpoint):
    with serve_replicas(fleet_checkpoint, 3) as (procs, ports):
        gw = Gateway(parse_config(fleet_config(ports), "fleet.toml"))
        with running_gateway(gw) as url:
            asyncio.run(scenario(gw, url, procs, ports))


async def scenario(gw: Gateway, url: str, procs: list[subprocess.Popen], ports: list[int]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        # affinity: one system prompt -> one replica for every user; one user (no system prompt) -> one replica
        system = "You are Grok, who answers in the words of the King James Bible."
        shared = [await one(client, chat(f"q{i}", system, max_tokens=2), f"u{i}") for i in range(4)]
        assert {r[0] for r in shared} == {200} and len({r[1] for r in shared}) == 1, shared
        home = ports[int(shared[0][1][1:])]
        metrics = httpx.get(f"http://127.0.0.1:{home}/metrics").text  # the prompt is computed once, there
        cached = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("gigafactory_serve_prefix_cached_tokens_total{"))
        assert cached >= 3 * 16, metrics[-2000:]  # at least one 16-token block reused by each later request
        alice = [await one(client, chat(f"question {i}"), "alice") for i in range(4)]
        assert {r[0] for r in alice} == {200} and len({r[1] for r in alice}) == 1, alice
        status, replica, [answer] = await one(client, chat("hello"), "bob")
        assert status == 200 and answer["model"] == "grok-tiny" and answer["choices"][0]["message"]["content"]

        results, starts, stop, i = [], [], asyncio.Event(), 0

        async def worker(w: int):
            nonlocal i
            while not stop.is_set():
                i += 1
                body = chat(f"Tell me about day {i}", stream=bool(i % 2), max_tokens=40)
                starts.append(time.monotonic())
                results.append((starts[-1], body["stream"], await one(client, body, f"user-{i % 17}")))

        workers = [asyncio.create_task(worker(w)) for w in range(12)]
        deadline = time.monotonic() + 20
        while not any(s.outstanding >= 2 for s in gw.pool.replicas.values()) or len(results) < 6:
            assert time.monotonic() < deadline, "no load built up"
            await asyncio.sleep(0.01)
        victim = max(gw.pool.replicas.values(), key=lambda s: s.outstanding)
        in_flight = victim.outstanding
        killed_at = time.monotonic()
        procs[int(victim.name[1:])].send_signal(signal.SIGKILL)
        while victim.healthy:
            assert time.monotonic() - killed_at < 5, "the dead replica is still in the pool after 5 s"
            await asyncio.sleep(0.02)
        left_after = time.monotonic() - killed_at
        while sum(t > killed_at + left_after for t in starts) < 8:  # the load goes on without it
            assert time.monotonic() - killed_at < 60, "the load stalled after the kill"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=60)  # nothing hangs

    assert in_flight >= 1
    after = [(stream, r) for t, stream, r in results if t > killed_at + left_after]
    cut = 0
    for _, stream, (status, replica, events) in results:
        assert status == 200, (status, events)  # no 5xx: whatever had not streamed was retried elsewhere
        if stream:
            assert events[-1] == "[DONE]", events
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            if errors:  # cut off mid-stream by the kill: one clean error event, then [DONE]
                assert len(errors) == 1 and errors[0]["error"]["code"] == "upstream_failed" and replica == victim.name
                cut += 1
    assert after and all(r[1] != victim.name for _, r in after)  # the rest of the load went to the other two
    attempts = gw.metrics.attempts
    lost = sum(attempts.labels(replica=victim.name, outcome=o)._value.get() for o in ("unreachable", "stream_broken"))
    assert lost >= 1 and cut <= in_flight  # the kill did hit requests in flight, and only those could be cut
    print(f"\nkilled {victim.name} with {in_flight} in flight; out of the pool after {left_after * 1000:.0f} ms; "
          f"{len(results)} requests, {cut} streams cut, retries {gw.metrics.retries._value.get():.0f}")
