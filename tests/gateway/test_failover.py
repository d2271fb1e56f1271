"""A replica that stops answering (no reset, no error: a stopped process or a partition) leaves the pool after its
health checks time out, and once they have timed out for hung_after_s the requests waiting on it are moved to another
replica, not after the read timeout: nothing hangs. A replica that is only slow to answer its checks keeps its
requests."""

from __future__ import annotations

import asyncio
import time

import httpx

from gigafactory.gateway.app import Gateway, create_app
from gigafactory.gateway.config import parse_config
from tests.gateway.fakes import FakeFleet, gateway_client

CONFIG = """
default_region = "EU"
[health]
interval_s = 0.2
timeout_s = 0.3
failures_to_eject = 2
hung_after_s = 0.5
[routing]
read_timeout_s = 60
[[replicas]]
url = "http://a"
region = "EU"
pool = "v1"
[[replicas]]
url = "http://b"
region = "EU"
pool = "v1"
[regions.EU]
fallback = "v1"
"""


def test_requests_waiting_on_a_hung_replica_move_within_its_health_timeouts():
    fleet = FakeFleet()

    async def scenario():
        async with gateway_client(CONFIG, fleet) as (gw, client):
            fleet.hung.add("a")
            started = time.monotonic()
            body = {"messages": [{"role": "user", "content": "hi"}]}
            answers = await asyncio.wait_for(asyncio.gather(*(client.post("/v1/chat/completions", json=body)
                                                              for _ in range(4))), timeout=20)
            elapsed = time.monotonic() - started
            assert [r.status_code for r in answers] == [200] * 4
            assert {r.headers["x-gateway-replica"] for r in answers} == {"b"}
            assert gw.pool.replicas["a"].assigned >= 1  # some were sent to a first ...
            assert elapsed < 3, elapsed  # ... and moved after ~0.5 s of timed-out checks, not the 60 s read timeout
            assert not gw.pool.replicas["a"].healthy and gw.pool.replicas["a"].outstanding == 0

    asyncio.run(scenario())


def test_a_replica_slow_to_answer_its_checks_keeps_its_requests():
    fleet = FakeFleet()
    slow = CONFIG.replace("hung_after_s = 0.5", "hung_after_s = 30")

    async def scenario():
        async with gateway_client(slow, fleet) as (gw, client):
            fleet.hung.add("a")
            body = {"messages": [{"role": "user", "content": "hi"}]}
            pending = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(4)]
            while gw.pool.replicas["a"].healthy:  # its checks time out: out of the pool for new requests ...
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            waiting = gw.pool.replicas["a"].outstanding
            assert waiting >= 1 and not any(t.done() and t.result().headers.get("x-gateway-replica") == "a" for t in pending)
            fleet.hung.discard("a")  # ... but what it runs is not cut while it may still answer
            answers = await asyncio.wait_for(asyncio.gather(*pending), timeout=20)
            assert [r.status_code for r in answers] == [200] * 4
            assert sum(r.headers["x-gateway-replica"] == "a" for r in answers) == waiting  # answered by a, not cut

    asyncio.run(scenario())


def test_when_every_replica_only_misses_its_checks_requests_still_go_to_them():
    fleet = FakeFleet()
    slow = CONFIG.replace("hung_after_s = 0.5", "hung_after_s = 30")

    async def scenario():
        async with gateway_client(slow, fleet) as (gw, client):
            fleet.hung.update({"a", "b"})  # a load spike: both miss their checks
            while any(s.healthy for s in gw.pool.replicas.values()):
                await asyncio.sleep(0.05)
            request = asyncio.create_task(client.post("/v1/chat/completions",
                                                      json={"messages": [{"role": "user", "content": "hi"}]}))
            await asyncio.sleep(0.3)
            fleet.hung.clear()
            answer = await asyncio.wait_for(request, timeout=20)
            assert answer.status_code == 200  # sent to a slow replica, not refused with a 503

    asyncio.run(scenario())


def test_a_client_that_leaves_a_non_streamed_request_frees_the_replica():
    """The gateway notices the disconnect while the replica is still working and closes the upstream request."""
    fleet = FakeFleet()
    fleet.hung.add("a")
    fleet.hung.add("b")

    async def scenario():
        gw = Gateway(parse_config(CONFIG.replace("hung_after_s = 0.5", "hung_after_s = 30"), "t.toml"),
                     transport=httpx.ASGITransport(fleet.app))
        app = create_app(gw)
        async with app.router.lifespan_context(app):
            for s in gw.pool.replicas.values():
                gw.pool.set_health(s, True)
            body = b'{"messages": [{"role": "user", "content": "hi"}]}'
            sent, left = [], asyncio.Event()

            async def receive():
                if not sent:
                    sent.append(1)
                    return {"type": "http.request", "body": body, "more_body": False}
                await left.wait()
                return {"type": "http.disconnect"}

            messages = []

            async def send(message):
                messages.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                     "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
                     "headers": [(b"content-type", b"application/json"), (b"host", b"gw")],
                     "client": ("127.0.0.1", 1), "server": ("gw", 80)}
            call = asyncio.create_task(app(scope, receive, send))
            while not any(s.outstanding for s in gw.pool.replicas.values()):
                await asyncio.sleep(0.02)
            left.set()  # the client goes away while the replica is still generating
            await asyncio.wait_for(call, timeout=5)
            assert fleet.abandoned == 1 and all(s.outstanding == 0 for s in gw.pool.replicas.values())
            assert messages[0]["status"] == 499

    asyncio.run(scenario())
