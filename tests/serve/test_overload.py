"""Overload: a bounded queue (503 + Retry-After), per-request deadlines (504), /health vs /ready, and /metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests.serve.conftest import make_state, running_server


def _hold_decode(engine):
    """Make the engine's decode wait on an event, so requests pile up deterministically; returns the event."""
    release, decode = threading.Event(), engine.runner.decode
    engine.runner.decode = lambda seqs: release.wait(20) and decode(seqs)
    return release


def test_full_queue_is_503_with_retry_after_and_ready_says_so(loaded):
    state = make_state(loaded, n_slots=1)
    engine = state.engines["grok-tiny"]
    engine.max_waiting = 2
    release = _hold_decode(engine)
    body = {"prompt": "In", "max_tokens": 3, "ignore_eos": True}
    with running_server(state) as url:
        assert httpx.get(url + "/ready").status_code == 200

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                running = asyncio.create_task(client.post("/v1/completions", json=body))
                while engine.n_running < 1:  # holds the only slot, stuck in decode
                    await asyncio.sleep(0.005)
                waiting = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
                while engine.queue_length < 2:
                    await asyncio.sleep(0.005)
                refused = await client.post("/v1/completions", json=body)
                ready, health = await client.get("/ready"), await client.get("/health")
                release.set()
                return refused, ready, health, await asyncio.gather(running, *waiting)

        refused, ready, health, served = asyncio.run(asyncio.wait_for(main(), 60))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        assert ready.status_code == 503 and "queue full" in ready.json()["problems"][0]
        assert health.status_code == 200  # alive, just busy: nobody should restart it
        assert [r.status_code for r in served] == [200, 200, 200]  # the admitted ones are unaffected
        assert httpx.get(url + "/ready").status_code == 200
        text = httpx.get(url + "/metrics").text
    assert 'gigafactory_serve_rejected_total{model="grok-tiny"} 1.0' in text
    assert 'gigafactory_serve_errors_total{type="overloaded"} 1.0' in text


def test_deadline_ends_a_request_with_504_and_frees_its_slot(loaded):
    state = make_state(loaded, n_slots=2)
    state.request_timeout = 0.3
    engine = state.engines["grok-tiny"]
    decode = engine.runner.decode
    engine.runner.decode = lambda seqs: time.sleep(0.05) or decode(seqs)  # 60 tokens take ~3 s: past the deadline
    with running_server(state) as url:
        slow = httpx.post(url + "/v1/completions", json={"prompt": "In", "max_tokens": 60, "ignore_eos": True}, timeout=30)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "In", "max_tokens": 60, "ignore_eos": True, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert '"code": "timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        state.request_timeout = 30
        ok = httpx.post(url + "/v1/completions", json={"prompt": "In", "max_tokens": 3, "ignore_eos": True}, timeout=30)
        assert ok.status_code == 200
        deadline = time.monotonic() + 5
        while engine.kv.n_free != 2:  # the expired requests gave their slots back
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_ready_is_503_when_the_engine_is_not_running(loaded):
    state = make_state(loaded, n_slots=1)
    with running_server(state) as url:
        assert httpx.get(url + "/ready").status_code == 200
        state.engines["grok-tiny"].stop()
        r = httpx.get(url + "/ready")
        assert r.status_code == 503 and "engine not running" in r.json()["problems"][0]
        assert httpx.get(url + "/health").status_code == 200


def test_metrics_histograms_errors_and_queue(server):
    url, _ = server
    for _ in range(2):
        assert httpx.post(url + "/v1/completions", json={"prompt": "In", "max_tokens": 4, "ignore_eos": True}).status_code == 200
    httpx.post(url + "/v1/completions", json={"prompt": "In", "tools": []})
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for series in ('gigafactory_serve_request_latency_seconds_bucket{le="+Inf",model="grok-tiny"}',
                   'gigafactory_serve_time_to_first_token_seconds_count{model="grok-tiny"}',
                   'gigafactory_serve_inter_token_latency_seconds_count{model="grok-tiny"}',
                   'gigafactory_serve_errors_total{type="unsupported_parameter"}',
                   'gigafactory_serve_queue_length{model="grok-tiny"}',
                   'gigafactory_serve_running_requests{model="grok-tiny"}',
                   'gigafactory_serve_kv_cache_usage_ratio{model="grok-tiny"}',
                   'gigafactory_serve_requests_total{endpoint="/v1/completions",status="400"}'):
        assert series in text, series
    itl = next(line for line in text.splitlines()
               if line.startswith('gigafactory_serve_inter_token_latency_seconds_count{model="grok-tiny"}'))
    assert float(itl.split()[-1]) >= 6  # 3 gaps for each of the two 4-token requests
