"""Token quotas: each answer's usage (non-streamed `usage`, a stream's final usage chunk, asked of the replica when the
client did not ask) debits the key; a key over its quota is a 429 before any replica is touched; with several
gateway pods each enforces its share of every limit."""

from __future__ import annotations

import asyncio
import json

import pytest

from gigafactory.errors import UserError
from gigafactory.gateway.app import access_keys
from gigafactory.gateway.config import TokenQuota, parse_config
from gigafactory.gateway.quota import TokenLedger, pod_share
from gigafactory.gateway.usage import UsageMeter
from tests.gateway.fakes import FakeFleet, gateway_client

KEYS = """
[keys."sk-alice"]
name = "alice"
[keys."sk-bob"]
name = "bob"
requests_per_day = 3
"""

CONFIG = """
api_keys = "keys.toml"
default_region = "EU"
{extra}
[[replicas]]
url = "http://eu1"
region = "EU"
pool = "v1"
[regions.EU]
fallback = "v1"
[token_quota]
window_s = 3600
tokens = 0
[token_quota.keys]
alice = 30
"""

HELLO = {"messages": [{"role": "user", "content": "hello there"}]}  # 2 prompt tokens + 5 completion tokens


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(tmp_path, scenario, extra: str = ""):
    (tmp_path / "keys.toml").write_text(KEYS)
    fleet, clock = FakeFleet(), Clock(3600 * 500_000 + 100.0)

    async def main():
        async with gateway_client(CONFIG.format(extra=extra), fleet, clock=clock, base_dir=tmp_path) as (gw, client):
            await scenario(gw, client, fleet, clock)

    asyncio.run(main())


def chat(client, key, **body):
    return client.post("/v1/chat/completions", json={**HELLO, **body}, headers={"Authorization": f"Bearer {key}"})


def events(text: str) -> list:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def test_usage_of_answers_and_streams_debits_the_key_until_it_gets_429(tmp_path):
    async def scenario(gw, client, fleet, clock):
        r = await chat(client, "sk-alice")
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 7
        assert gw.tokens.used("sk-alice") == 7

        # a stream whose client did not ask for usage: the replica is asked, the client never sees it
        r = await chat(client, "sk-alice", stream=True)
        assert fleet.bodies[-1]["stream_options"] == {"include_usage": True}
        chunks = events(r.text)
        assert len(chunks) == 5 and all("usage" not in c and c["choices"] for c in chunks)
        assert r.text.rstrip().endswith("data: [DONE]")
        assert gw.tokens.used("sk-alice") == 14

        # a stream that asked: it gets the usage chunk, as the replica sent it
        r = await chat(client, "sk-alice", stream=True, stream_options={"include_usage": True})
        assert events(r.text)[-1] == {"id": "x", "object": "chat.completion.chunk", "choices": [],
                                      "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}
        assert gw.tokens.used("sk-alice") == 21

        fleet.completion_tokens = 20  # the request admitted below the limit may overshoot it (usage comes after)
        assert (await chat(client, "sk-alice")).status_code == 200
        assert gw.tokens.used("sk-alice") == 43
        served = len(fleet.served)
        for stream in (False, True):
            r = await chat(client, "sk-alice", stream=stream)
            assert r.status_code == 429 and len(fleet.served) == served  # no replica touched
            assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                          "param": None, "code": "token_quota_exceeded"}}
            assert "30 tokens per 3600 s" in r.json()["error"]["message"]
            assert r.headers["Retry-After"] == str(3600 - 100)  # until the window ends

        assert (await chat(client, "sk-bob")).status_code == 200  # bob has no token quota
        assert gw.tokens.used("sk-bob") == 22
        clock.now += 3600  # the next window
        assert (await chat(client, "sk-alice")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'gigafactory_gateway_tokens_total{kind="prompt",pool="v1"} 12.0' in metrics
        assert 'gigafactory_gateway_tokens_total{kind="completion",pool="v1"} 75.0' in metrics
        assert 'gigafactory_gateway_refused_total{code="token_quota_exceeded"} 2.0' in metrics

    run(tmp_path, scenario)


def test_each_of_several_pods_enforces_its_share(tmp_path):
    async def scenario(gw, client, fleet, clock):
        assert gw.tokens.limit("alice") == 15 and gw.tokens.limit("bob") == 0  # 30 over 2 pods; bob: unlimited
        assert [(await chat(client, "sk-alice")).status_code for _ in range(4)] == [200, 200, 200, 429]  # 7, 14, 21
        # bob's 3 requests a day: 1 here (the other pod admits the rest); rate_limit 120/min: 60 here
        assert [(await chat(client, "sk-bob")).status_code for _ in range(2)] == [200, 429]
        assert gw.limiter.default_rpm == 60

    run(tmp_path, scenario, extra="pods = 2\nrate_limit = 120")


def test_pod_share_and_ledger_windows():
    assert pod_share(None, 3) is None and pod_share(0, 3) == 0 and pod_share(90.0, 1) == 90.0
    assert pod_share(90.0, 4) == 22.5 and pod_share(10, 4, whole=True) == 2 and pod_share(3, 4, whole=True) == 1
    ledger = TokenLedger(TokenQuota(tokens=100, window_s=60.0), clock=lambda: 0.0)
    ledger.debit("k", 100, now=61.0)
    assert ledger.check("k", "any", now=65.0) == pytest.approx(55.0)
    assert ledger.check("k", "any", now=120.0) == 0 and ledger.used("k", now=120.0) == 0


def test_stream_meter_strips_usage_it_added_and_estimates_a_cut_stream():
    charged = []
    meter = UsageMeter({"stream": True, "messages": [{"role": "user", "content": "x" * 400}]},
                       lambda *a: charged.append(a))
    # a backend that reports running usage inside content chunks (vLLM's continuous_usage_stats)
    block = (b'data: {"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}'
             b'\n\ndata: {"choices": [{"delta": {"content": "b"}}], "usage": null}\n\n')
    out = meter.relay(block)
    assert [json.loads(e[6:]) for e in out.decode().split("\n\n") if e] == [
        {"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]}]
    meter.settle()
    meter.settle()
    assert charged == [(9, 1, False)]

    cut = UsageMeter({"stream": True, "messages": [{"role": "user", "content": "x" * 400}]}, lambda *a: charged.append(a))
    cut.relay(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n' * 3)
    cut.settle()  # the replica died (or the client left) before the usage chunk: an estimate is charged
    assert charged[-1][1:] == (3, True) and 100 <= charged[-1][0] <= 130
    assert UsageMeter({"stream": True, "stream_options": "yes"}, print).upstream_body(
        {"stream": True, "stream_options": "yes"}) == {"stream": True, "stream_options": "yes"}  # the replica's 400


BASE = '[[replicas]]\nurl = "http://a"\nregion = "EU"\npool = "v1"\n[regions.EU]\nfallback = "v1"\n'


@pytest.mark.parametrize("top, tables, message", [
    ('api_keys = "keys.toml"', "[token_quota.keys]\ncarol = 10", "names no key called carol"),
    ('api_keys = "keys.toml"', "[token_quota.keys]\nalice = -5", "whole number of tokens"),
    ('api_keys = "keys.toml"', "[token_quota]\nwindow_s = 0", "window_s = 0 must be between 1"),
    ('api_keys = "keys.toml"\npods = 0', "", "pods = 0 must be >= 1"),
    ("", "[token_quota]\ntokens = 5", "token_quota limits tokens per API key, and no key is configured"),
])
def test_bad_token_quota_config_is_one_line(tmp_path, top, tables, message):
    (tmp_path / "keys.toml").write_text(KEYS)
    with pytest.raises(UserError, match=message):
        access_keys(parse_config(f"{top}\n{BASE}{tables}\n", "g.toml", tmp_path))
