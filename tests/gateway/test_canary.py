"""The rollout as fleet policy, driven through the gateway: a phase advances while its pool stays inside the SLO,
rolls back (and freezes) on an injected error rate, and the kill switch (admin route or config + reload) sends
everyone to the fallback. Decisions are JSON lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from tests.gateway.fakes import FakeFleet, gateway_client

CONFIG = """
decisions_log = "decisions.jsonl"
state_file = "state.json"
admin_key_env = "TEST_GATEWAY_ADMIN"
salt = "t"
[slo]
window_s = 600
max_error_rate = 0.1
max_p99_s = 5
min_requests = 8
hold_s = 0
evaluate_every_s = 1000
[health]
interval_s = 1000
[[replicas]]
url = "http://v1a"
region = "EU"
pool = "grok-v1"
[[replicas]]
url = "http://v2a"
region = "EU"
pool = "grok-v2"
[[replicas]]
url = "http://v2b"
region = "EU"
pool = "grok-v2"
[regions.EU]
countries = ["DE", "FR"]
fallback = "grok-v1"
[[regions.EU.phases]]
pool = "grok-v2"
percent = 30
allow = ["tester"]
[[regions.EU.phases]]
pool = "grok-v2"
percent = 70
"""


async def ask(client, user: str, headers: dict | None = None):
    return await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                             headers={"X-User-Id": user, "X-Region": "DE", **(headers or {})})


async def wave(client, n: int = 60) -> dict[str, int]:
    """n users once each; how many were answered by each pool (all must be 200)."""
    pools: dict[str, int] = {}
    for i in range(n):
        r = await ask(client, f"user-{i}")
        assert r.status_code == 200, r.text
        pools[r.json()["model"]] = pools.get(r.json()["model"], 0) + 1
    return pools


def test_phase_advances_inside_the_slo_and_rolls_back_on_injected_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_GATEWAY_ADMIN", "adm-secret")
    fleet = FakeFleet()

    async def scenario():
        async with gateway_client(CONFIG, fleet, base_dir=tmp_path, path=None) as (gw, client):
            status = gw.controller.status()["EU"]
            assert status["phase"] == 0  # start time 0: the first phase begins at startup
            first = await wave(client)
            assert 0 < first["grok-v2"] < first["grok-v1"]  # ~30% on the canary pool, the rest on the fallback
            assert (await ask(client, "tester")).json()["model"] == "grok-v2"  # allowlisted

            [advance] = gw.controller.evaluate()
            assert advance["action"] == "advance" and advance["to_phase"] == 1 and advance["error_rate"] == 0
            second = await wave(client)
            assert second["grok-v2"] > first["grok-v2"]  # 70% now, the 30% still in
            assert (await ask(client, "tester")).json()["model"] == "grok-v2"  # an earlier phase's allowlist holds

            fleet.fail_rate["v2a"] = 1.0  # one canary replica answers 500 to everything
            await wave(client)  # clients still get 200: each failed attempt is retried on v2b ...
            [rollback] = gw.controller.evaluate()  # ... but the canary's attempts carry the error rate
            assert rollback["action"] == "rollback" and rollback["to_phase"] == 0, rollback
            assert rollback["error_rate"] > 0.1
            fleet.fail_rate.clear()
            await wave(client)
            assert gw.controller.evaluate() == []  # frozen after a rollback: nothing moves on its own
            assert gw.controller.status()["EU"]["phase"] == 0

            # the kill switch: admin key required; then everyone is on the fallback pool
            assert (await client.post("/admin/kill", json={"region": "EU"})).status_code == 401
            r = await client.post("/admin/kill", json={"region": "EU"}, headers={"Authorization": "Bearer adm-secret"})
            assert r.status_code == 200 and r.json()["decisions"][0]["action"] == "kill"
            assert (await wave(client, 20)) == {"grok-v1": 20}
            assert (await ask(client, "tester")).json()["model"] == "grok-v1"
            r = await client.post("/admin/resume", json={}, headers={"Authorization": "Bearer adm-secret"})
            assert r.status_code == 200
            assert (await ask(client, "tester")).json()["model"] == "grok-v2"
            status = (await client.get("/admin/status", headers={"Authorization": "Bearer adm-secret"})).json()
            assert status["regions"]["EU"]["phase"] == 0 and not status["regions"]["EU"]["killed"]

    asyncio.run(scenario())
    lines = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert [d["action"] for d in lines] == ["start", "advance", "rollback", "kill", "resume"]
    assert json.loads((tmp_path / "state.json").read_text())["EU"]["phase"] == 0


def test_p99_over_the_slo_rolls_back_and_kill_by_config_and_sighup(tmp_path):
    fleet = FakeFleet()
    now = [1000.0]
    toml_path = tmp_path / "gateway.toml"
    toml_path.write_text(CONFIG)

    async def scenario():
        async with gateway_client(CONFIG, fleet, clock=lambda: now[0], base_dir=tmp_path, path=str(toml_path)) as (gw, client):
            for i in range(10):
                gw.controller.record("EU", True, 9.0 if i == 9 else 0.1)  # one slow answer: p99 = 9 s > 5 s
            [d] = gw.controller.evaluate()
            assert d["action"] == "rollback" and d["to_phase"] == -1 and d["p99_s"] == 9.0
            assert (await ask(client, "tester")).json()["model"] == "grok-v1"  # before phase 0: fallback only

            toml_path.write_text(CONFIG.replace('fallback = "grok-v1"', 'fallback = "grok-v1"\nkilled = true'))
            os.kill(os.getpid(), signal.SIGHUP)  # the lifespan's handler re-reads the file (we are the main thread)
            for _ in range(100):
                if gw.controller.status()["EU"]["killed"]:
                    break
                await asyncio.sleep(0.02)
            assert gw.controller.status()["EU"]["killed"]
            assert (await ask(client, "tester")).json()["model"] == "grok-v1"
            toml_path.write_text("not toml [")
            assert not gw.reload()  # a broken file keeps the running config
            assert gw.controller.status()["EU"]["killed"]

    asyncio.run(scenario())
    actions = [json.loads(line)["action"] for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert actions == ["start", "rollback", "kill"]


def test_a_phase_waits_for_its_start_time(tmp_path):
    fleet = FakeFleet()
    now = [1_800_000_000.0]
    toml = CONFIG.replace('percent = 30', 'percent = 30\nstart = 2030-01-01T00:00:00Z')

    async def scenario():
        async with gateway_client(toml, fleet, clock=lambda: now[0], base_dir=tmp_path) as (gw, client):
            assert gw.controller.status()["EU"]["phase"] == -1
            assert (await wave(client, 10)) == {"grok-v1": 10}
            now[0] = 1_893_456_000.0  # 2030-01-01
            assert gw.controller.evaluate()[0]["action"] == "start"
            assert gw.controller.status()["EU"]["phase"] == 0

    asyncio.run(scenario())
