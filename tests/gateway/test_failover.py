"""A replica that stops answering (no reset, no error: a stopped process or a partition) leaves the pool after its
health checks time out, and the requests waiting on it are moved to another replica then, not after the read
timeout: nothing hangs."""

from __future__ import annotations

import asyncio
import time

from tests.gateway.fakes import FakeFleet, gateway_client

CONFIG = """
default_region = "EU"
[health]
interval_s = 0.2
timeout_s = 0.3
failures_to_eject = 2
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
            assert elapsed < 3, elapsed  # ... and moved after ~2 x 0.3 s of failed checks, not the 60 s read timeout
            assert not gw.pool.replicas["a"].healthy and gw.pool.replicas["a"].outstanding == 0

    asyncio.run(scenario())
