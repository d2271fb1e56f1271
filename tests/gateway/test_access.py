"""Keys, rate limits and quotas live in the gateway, shared by every replica behind it; identity and region come
from the key or a trusted proxy, never from a client's own headers; bad bodies are 4xx before any replica is used."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gigafactory.errors import UserError
from gigafactory.gateway.app import Gateway, create_app
from gigafactory.gateway.config import parse_config
from gigafactory.serve.access import DailyQuota, load_keys
from tests.gateway.fakes import FakeFleet

KEYS = """
[keys."sk-alice"]
name = "alice"
region = "DE"
requests_per_minute = 600
requests_per_day = 3
[keys."sk-bob"]
name = "bob"
requests_per_minute = 6
[keys."sk-tester"]
name = "tester"
region = "US"
"""

CONFIG = """
api_keys = "keys.toml"
[[replicas]]
url = "http://eu1"
region = "EU"
pool = "v1"
[[replicas]]
url = "http://eu2"
region = "EU"
pool = "v2"
[regions.EU]
countries = ["DE"]
[[regions.EU.phases]]
pool = "v2"
allow = ["tester"]
[regions.US]
fallback = "v1"
[routing]
cross_region = true
"""


def run(tmp_path, scenario, client_addr=("127.0.0.1", 5000)):
    (tmp_path / "keys.toml").write_text(KEYS)
    fleet = FakeFleet()

    async def main():
        gw = Gateway(parse_config(CONFIG, "g.toml", tmp_path), transport=httpx.ASGITransport(fleet.app))
        app = create_app(gw)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app, client=client_addr)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                await scenario(gw, client, fleet)

    asyncio.run(main())


def post(client, key=None, body=None, **headers):
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return client.post("/v1/chat/completions", json=body or {"messages": [{"role": "user", "content": "hi"}]},
                       headers=headers)


def test_keys_limits_quota_and_identity(tmp_path):
    async def scenario(gw, client, fleet):
        r = await post(client)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await post(client, "sk-nobody")).status_code == 401
        # alice's key says DE -> EU; EU admits only the allowlist; claiming another user's id changes nothing
        r = await post(client, "sk-alice", **{"X-User-Id": "tester"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_in_rollout"
        # tester's key is in the US (fallback v1); a trusted proxy's region header moves them to EU (allowlisted: v2)
        assert (await post(client, "sk-tester")).json()["model"] == "v1"
        assert (await post(client, "sk-tester", **{"X-Region": "DE"})).json()["model"] == "v2"
        r = await post(client, "sk-tester", **{"X-Region": "JP"})  # the proxy's word beats the key's: not served there
        assert r.status_code == 403 and "not available in region JP" in r.json()["error"]["message"]
        # quota: alice has 3 requests a day (the 403 above counted: it had passed the quota check)
        assert [(await post(client, "sk-alice")).status_code for _ in range(2)] == [403, 403]
        r = await post(client, "sk-alice")
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded" and int(r.headers["Retry-After"]) > 0
        # bob: 6 per minute = bursts of 1
        bob = [await post(client, "sk-bob", **{"X-Region": "US"}) for _ in range(2)]
        assert [r.status_code for r in bob] == [200, 429] and bob[1].json()["error"]["code"] == "rate_limit_exceeded"
        # bodies
        r = await client.post("/v1/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sk-tester"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await client.post("/v1/chat/completions", content=b"[" * 5000 + b"]" * 5000,
                              headers={"Authorization": "Bearer sk-tester"})
        assert r.status_code == 400
        r = await client.post("/v1/chat/completions", content=b"x" * (2 << 20), headers={"Authorization": "Bearer sk-tester"})
        assert r.status_code == 413
        assert (await client.get("/v1/models")).status_code == 401
        models = await client.get("/v1/models", headers={"Authorization": "Bearer sk-tester"})
        assert [m["id"] for m in models.json()["data"]] == ["v1", "v2"]

    run(tmp_path, scenario)


def test_headers_from_an_untrusted_peer_are_ignored_and_no_replica_is_a_503(tmp_path):
    async def scenario(gw, client, fleet):
        assert (await post(client, "sk-tester", **{"X-Region": "DE"})).json()["model"] == "v1"  # stays in the US
        fleet.fail_rate["eu1"] = 1.0  # the only v1 replica fails the request itself: its own 500 is the answer
        r = await post(client, "sk-tester")
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert r.headers["x-gateway-replica"] == "eu1"
        fleet.fail_rate.clear()
        for s in gw.pool.replicas.values():
            gw.pool.set_health(s, False, "test", dead=True)
        r = await post(client, "sk-tester")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "no healthy replica of pool 'v1'" in r.json()["error"]["message"]
        assert (await client.get("/ready")).status_code == 503  # nothing to route to
        fleet.down.add("eu2")
        await gw.pool.check_all(gw.proxy.client)
        ready = await client.get("/ready")  # one pool down is not the whole front door down
        assert ready.status_code == 200 and ready.json()["healthy_replicas"] == {"v1": 1, "v2": 0}
        assert ready.json()["empty_pools"] == ["v2"]
        text = (await client.get("/metrics")).text
        assert 'gigafactory_gateway_replica_healthy{replica="eu2"} 0.0' in text
        assert 'gigafactory_gateway_refused_total{code="upstream_unavailable"} 1.0' in text

    run(tmp_path, scenario, client_addr=("10.9.8.7", 5000))


def test_quota_resets_at_midnight_utc_and_serve_refuses_the_quota_field(tmp_path):
    quota, day = DailyQuota(), 86400 * 20000
    assert [quota.check("k", 2, now=day + 10) for _ in range(2)] == [0, 0]
    assert quota.check("k", 2, now=day + 100) == pytest.approx(86400 - 100)
    assert quota.check("k", 2, now=day + 86400) == 0
    (tmp_path / "keys.toml").write_text(KEYS)
    with pytest.raises(UserError, match="unknown field.*requests_per_day"):
        load_keys(str(tmp_path / "keys.toml"), env="")  # serve does not enforce quotas, so it must not accept one
    assert load_keys(str(tmp_path / "keys.toml"), env="", quotas=True)["sk-alice"].requests_per_day == 3
