"""The engine in its own process (serve/engine_core.py + engine_client.py): same answers as the in-thread engine,
one message per engine step, grammars and deadlines across the boundary, and a core that dies or loses its parent."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from multiprocessing import Pipe

import httpx
import pytest

from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine
from gigafactory.serve.engine_core import SHARED_CLOCK, MetricsRelay, serve
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.responses import _merge
from tests.serve.test_hardening import BAD

GREEDY = {"prompt": "In the beginning", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_process_engine_answers_like_the_thread_engine(server, process_server):
    """Greedy text, token counts and logprobs equal; streamed pieces add up to the whole answer; metrics filled."""
    (thread_url, _), (url, state) = server, process_server
    body = {**GREEDY, "logprobs": 2}
    want = httpx.post(thread_url + "/v1/completions", json=body, timeout=60).json()
    got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"] == want["usage"]
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        want["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    with httpx.stream("POST", url + "/v1/completions", json={**GREEDY, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    m = state.metrics
    assert m.generation_tokens.get(model="grok-tiny") == 24 and m.prompt_tokens.get(model="grok-tiny") > 0
    assert b'time_to_first_token_seconds_count{model="grok-tiny"} 2.0' in m.render()


def test_structured_output_crosses_the_process_boundary(process_server):
    """The grammar travels as its spec and is compiled again in the core: the only valid answer comes back."""
    url, _ = process_server
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"], "additionalProperties": False}
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 1.0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    choice = r.json()["choices"][0]
    assert json.loads(choice["message"]["content"]) == {"a": "x"} and choice["finish_reason"] == "stop", choice


@pytest.mark.parametrize("path,body,code,param", BAD[::3])
def test_hostile_input_is_4xx_through_the_process_path(process_server, path, body, code, param):
    url, _ = process_server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + path, headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text[:300]


def test_hostile_values_reach_the_core_and_end_alone(process_server):
    url, _ = process_server
    r = httpx.post(url + "/v1/completions", json={"prompt": [1, 10**6]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # checked against the config's vocab
    r = httpx.post(url + "/v1/completions", json={**GREEDY, "temperature": 1e-300}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12


def test_deadlines_use_the_shared_clock(process_server):
    """A deadline is a perf_counter value of the HTTP process; the core compares it with its own clock."""
    assert SHARED_CLOCK == os.uname().sysname.startswith("Linux")
    engine = process_server[1].engines["grok-tiny"]
    done, out = threading.Event(), []
    engine.submit([5, 6, 7], SamplingParams(0, max_tokens=40), lambda t, f: f and (out.append(f), done.set()),
                  ignore_eos=True, deadline=time.perf_counter() - 1)
    assert done.wait(30) and out == ["timeout"]


def test_one_message_per_step_and_the_core_exits_when_the_http_side_goes(loaded):
    """The core loop in this process, over a real pipe: a step's message carries every request's new tokens; closing
    the HTTP end ends the loop."""
    engine = Engine(loaded.model, loaded.tokenizer, "t", n_slots=4, metrics=MetricsRelay())
    http_end, core_end = Pipe()
    loop = threading.Thread(target=serve, args=(core_end, engine), daemon=True)
    loop.start()
    for rid in (1, 2):
        http_end.send(("submit", rid, [5, 6, rid], SamplingParams(0, max_tokens=6), [], None, True, 1, frozenset(),
                       time.perf_counter(), None))
    tokens, finished, steps = {1: [], 2: []}, set(), 0
    while len(finished) < 2:
        assert http_end.poll(30)
        kind, seen, state, changed, calls = http_end.recv()
        steps += kind == "step" and bool(changed)
        for rid, pieces, ids, lps in changed:
            tokens[rid] += ids
            assert len(lps) == len(ids)
            finished |= {rid for _, fin in pieces if fin}
    assert seen == 2 and tokens[1] and len(tokens[1]) == len(tokens[2]) == 6 and steps <= 7
    http_end.close()
    loop.join(5)
    assert not loop.is_alive()


def test_queued_events_fold_into_one_piece_per_choice():
    assert _merge([(0, "a", None), (1, "x", None), (0, "b", None), (0, "", "stop")]) == [(0, "ab", "stop"),
                                                                                          (1, "x", None)]


def test_a_client_leaving_aborts_only_its_own_request(process_server):
    """With the engine process frozen, one client leaves and another waits: the abort crosses the pipe before any
    step, so only the staying request's tokens are generated, all of them."""
    url, state = process_server
    engine = state.engines["grok-tiny"]
    before = state.metrics.generation_tokens.get(model="grok-tiny")
    os.kill(engine.pid, signal.SIGSTOP)
    try:
        staying: list = []
        thread = threading.Thread(target=lambda: staying.append(
            httpx.post(url + "/v1/completions", json=GREEDY, timeout=60)))
        thread.start()
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={**GREEDY, "max_tokens": 40, "stream": True}):
            deadline = time.monotonic() + 30
            while engine.in_flight < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + 30
        while engine.in_flight > 1:  # the server has noticed the leaving client and sent its abort
            assert time.monotonic() < deadline, "the abort was never sent"
            time.sleep(0.01)
    finally:
        os.kill(engine.pid, signal.SIGCONT)
    thread.join(60)
    assert staying[0].status_code == 200 and staying[0].json()["usage"]["completion_tokens"] == 12
    time.sleep(0.2)
    assert state.metrics.generation_tokens.get(model="grok-tiny") - before == 12


def test_a_killed_core_fails_its_requests_and_is_restarted(process_server):
    """SIGKILL the engine process with streams in flight: they end with an error event (no hang), /ready goes 503,
    the core comes back and serves again. SIGINT alone does not stop it (Ctrl-C is for the HTTP process)."""
    url, state = process_server
    engine = state.engines["grok-tiny"]
    old_pid = engine.pid
    os.kill(old_pid, signal.SIGINT)
    time.sleep(0.3)
    assert engine.alive
    os.kill(old_pid, signal.SIGSTOP)  # frozen: the streams below are surely still in flight when it dies
    results: list = []

    def stream():
        body = {"prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            results.append([line for line in r.iter_lines() if line.startswith("data: ")])

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine.queue_length < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a stream hung after the engine process died"
    assert all(any("engine process exited" in line for line in lines) for lines in results), results
    assert httpx.get(url + "/ready").status_code == 503
    deadline = time.monotonic() + 60
    while httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the engine process did not come back"
        time.sleep(0.1)
    assert engine.restarts >= 1 and engine.pid != old_pid
    assert state.metrics.errors.get(type="engine_process_exit") >= 1
    r = httpx.post(url + "/v1/completions", json=GREEDY, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
