"""The HTTP API against a real uvicorn server: the official openai client, errors, disconnects, load."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from tests.serve.conftest import make_state, running_server


def test_openai_client_completion_and_streamed_chat(server, loaded):
    url, state = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["grok-tiny"]

    prompt = "In the beginning God"
    out = client.completions.create(model="grok-tiny", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    expected = list(generate_tokens(loaded.model, loaded.tokenizer.encode(prompt).ids,
                                    SamplingParams(temperature=0, max_tokens=12), stop_at_eos=False))
    assert out.choices[0].text == loaded.tokenizer.decode(expected)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(loaded.tokenizer.encode(prompt).ids), 12)

    stream = client.chat.completions.create(
        model="grok-tiny", stream=True, max_tokens=10, temperature=0.7, seed=3, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are Grok."}, {"role": "user", "content": "Who made light?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"], ["stop"])
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 10
    assert isinstance(text, str)

    chat = client.chat.completions.create(model="grok-tiny", max_tokens=5, seed=3, temperature=0.7,
                                          messages=[{"role": "user", "content": "Who made light?"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 5


def test_raw_sse_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "And", "max_tokens": 4, "stream": True,
                                                              "ignore_eos": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_over_http(server, loaded):
    url, _ = server
    full = httpx.post(url + "/v1/completions", json={"prompt": "And God said", "max_tokens": 20, "temperature": 0,
                                                     "ignore_eos": True}).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = httpx.post(url + "/v1/completions", json={"prompt": "And God said", "max_tokens": 20, "temperature": 0,
                                                    "ignore_eos": True, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"


BAD = [
    ("/v1/completions", b"{not json", "invalid_json"),
    ("/v1/completions", b"[1, 2]", "invalid_json"),
    ("/v1/completions", b"\xff\xfe", "invalid_json"),
    ("/v1/completions", {"prompt": "hi", "model": "grok-9000"}, "model_not_found"),
    ("/v1/completions", {"prompt": "word " * 200}, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "temperature": 9}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True, "stop": 7}, "invalid_value"),
    ("/v1/completions", {"prompt": ""}, None),
    ("/v1/completions", {"prompt": []}, None),
    ("/v1/completions", {"prompt": [99999]}, None),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None),
    ("/v1/completions", {}, "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
    ("/v1/chat/completions", {"messages": "hello"}, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 200}]}, "context_length_exceeded"),
]


@pytest.mark.parametrize("path,body,code", BAD)
def test_bad_requests_get_openai_style_4xx(server, path, body, code):
    url, _ = server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + path, headers={"content-type": "application/json"}, **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] and (code is None or err["code"] == code), err


@pytest.mark.parametrize("seed", [-1, 2**70, 0])
def test_any_integer_seed_works(server, seed):
    url, _ = server
    body = {"prompt": "In", "max_tokens": 3, "seed": seed, "temperature": 1.0}
    first, again = (httpx.post(url + "/v1/completions", json=body) for _ in range(2))
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_unknown_routes_and_methods_are_openai_style(server):
    url, _ = server
    for r in (httpx.get(url + "/v1/nothing"), httpx.get(url + "/v1/completions")):
        assert r.status_code in (404, 405) and "message" in r.json()["error"]


def test_health_metrics_and_page(server):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    httpx.post(url + "/v1/completions", json={"prompt": "In", "max_tokens": 2})
    text = httpx.get(url + "/metrics").text
    for name in ("gigafactory_serve_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
                 "gigafactory_serve_generation_tokens_per_second", "gigafactory_serve_time_to_first_token_seconds_count",
                 "gigafactory_serve_queue_length", "gigafactory_serve_generation_tokens_total"):
        assert name in text, name
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_client_disconnect_frees_the_slot(loaded):
    """Streamed or not, a client that leaves aborts its request long before max_tokens, and its slot comes back."""
    state = make_state(loaded, n_slots=2)
    engine = state.engines["grok-tiny"]
    seqs, submit, decode = [], engine.submit, engine.runner.decode
    engine.submit = lambda *a, **k: seqs.append(submit(*a, **k)) or seqs[-1]
    engine.runner.decode = lambda batch: time.sleep(0.05) or decode(batch)  # 63 tokens would take > 3 s
    body = {"prompt": "In", "max_tokens": 10_000, "ignore_eos": True}
    with running_server(state) as url:
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 3
        while len(seqs) < 2 or engine.n_running or engine.kv.n_free != engine.kv.n_slots:
            assert time.monotonic() < deadline, ("slot still held after the client left",
                                                 [(s.finish_reason, len(s.output_ids)) for s in seqs])
            time.sleep(0.02)
    assert [s.finish_reason for s in seqs] == ["abort", "abort"]
    assert all(len(s.output_ids) < 40 for s in seqs)


def test_load_with_malformed_requests_never_5xx(server):
    """200 requests from 50 concurrent clients, a fifth malformed: zero 5xx and the server still answers."""
    url, _ = server

    async def main():
        sem = asyncio.Semaphore(50)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=50)) as client:
            async def one(i):
                async with sem:
                    if i % 5 == 0:
                        bad = [b"{", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "many"}', b'{"messages": null}'][i % 4]
                        return (await client.post("/v1/completions", content=bad,
                                                  headers={"content-type": "application/json"})).status_code
                    if i % 2:
                        body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3, "stream": i % 3 == 0}
                        return (await client.post("/v1/chat/completions", json=body)).status_code
                    return (await client.post("/v1/completions", json={"prompt": f"n {i}", "max_tokens": 3})).status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(main())
    assert not [c for c in codes if c >= 500]
    assert codes.count(200) == 160 and all(400 <= c < 500 for i, c in enumerate(codes) if i % 5 == 0)
    assert httpx.get(url + "/health").status_code == 200
