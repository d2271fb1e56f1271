"""The replicas as the router sees them: healthy or not, and how many requests each has in flight.

A replica leaves the pool after `failures_to_eject` failed checks in a row (about that many seconds), or at once when a
proxied request finds it unreachable (connection refused or reset, a stalled read); a passing check brings it back.
Checks run concurrently, so one hung replica delays no other's verdict.

When it is dead (connection refused or reset) it leaves at once, and every wait on it is cut short (Watch): its
requests go elsewhere or end cleanly. When its checks time out it leaves after `failures_to_eject` of them, and its
waits are cut once the timeouts have lasted `hung_after_s`: a hung replica holds nobody for long, while one that is
only slow under load keeps finishing what it runs. A /ready 503 (a full queue) only stops new traffic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import httpx

from gigafactory.gateway.config import GatewayConfig, Replica

log = logging.getLogger(__name__)


@dataclass
class ReplicaState:
    replica: Replica
    healthy: bool = False  # nothing is routed to a replica before its first passing check
    failures: int = 0  # consecutive failed checks
    outstanding: int = 0  # requests in flight through this gateway
    assigned: int = 0  # requests ever sent (breaks ties between equally loaded replicas: round robin)
    last_error: str = ""
    changed_at: float = 0.0  # when it last entered or left the pool (monotonic)
    failing_since: float = 0.0  # first of the current run of failed checks (monotonic; 0 = passing)
    dead: bool = False  # the last failure was a refused or reset connection (not just slow)
    watches: set = field(default_factory=set)  # the Watch of every request waiting on it

    @property
    def name(self) -> str:
        return self.replica.name

    def auth_headers(self) -> dict[str, str]:
        key = os.environ.get(self.replica.api_key_env, "") if self.replica.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def status(self) -> dict:
        r = self.replica
        return {"name": r.name, "url": r.url, "region": r.region, "pool": r.pool, "healthy": self.healthy,
                "outstanding": self.outstanding, "assigned": self.assigned, "last_error": self.last_error}


class ReplicaLost(Exception):
    """The replica left the pool as unreachable while a request was waiting on it."""


class Watch:
    """Wraps each wait of one request on one replica (`async with watch:`); `fire()` (the replica is unreachable) ends
    the current and any later wait with ReplicaLost. Costs no task per wait: an asyncio.timeout rescheduled to now."""

    def __init__(self, state: ReplicaState):
        self.state, self.lost, self._timeout = state, False, None
        state.watches.add(self)

    def close(self) -> None:
        self.state.watches.discard(self)

    async def __aenter__(self):
        if self.lost:
            raise ReplicaLost(self.state.name)
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, kind, err, tb):
        timeout, self._timeout = self._timeout, None
        try:
            return await timeout.__aexit__(kind, err, tb)
        except TimeoutError:
            if self.lost:
                raise ReplicaLost(self.state.name) from None
            raise

    def fire(self) -> None:
        self.lost = True
        if self._timeout is not None and not self._timeout.expired():  # an expiring one is already on its way
            self._timeout.reschedule(asyncio.get_running_loop().time())


class Pool:
    def __init__(self, cfg: GatewayConfig, metrics=None):
        self.cfg, self.metrics = cfg, metrics
        self.replicas: dict[str, ReplicaState] = {r.name: ReplicaState(r) for r in cfg.replicas}

    def update(self, cfg: GatewayConfig) -> None:
        """A reloaded config: replicas that stay keep their health and load; new ones start unchecked."""
        old, self.cfg = self.replicas, cfg
        self.replicas = {}
        for r in cfg.replicas:
            state = old.get(r.name)
            if state is not None and state.replica.url == r.url:
                state.replica = r
                self.replicas[r.name] = state
            else:
                self.replicas[r.name] = ReplicaState(r)

    def candidates(self, region: str, pool: str) -> list[ReplicaState]:
        """Healthy replicas of `pool` in `region`; with routing.cross_region, another region's when it has none.
        When none is healthy, the ones that are only slow (checks timing out for less than hung_after_s, never
        refused): under a load spike every replica can miss its checks, and a slow answer beats a certain 503."""
        of_pool = [s for s in self.replicas.values() if s.replica.pool == pool
                   and (self.cfg.routing.cross_region or s.replica.region == region)]
        own = [s for s in of_pool if s.healthy and s.replica.region == region]
        healthy = own or [s for s in of_pool if s.healthy]
        if healthy:
            return healthy
        now, hung_after = time.monotonic(), self.cfg.health.hung_after_s
        return [s for s in of_pool if not s.dead and s.failing_since and now - s.failing_since < hung_after]

    def set_health(self, state: ReplicaState, ok: bool, error: str = "", dead: bool = False, silent: bool = False) -> None:
        """One verdict on a replica: ok, or failed; `dead` = refused/reset (out now, its waits cut), `silent` = timed
        out (its waits cut once silent for hung_after_s)."""
        now = time.monotonic()
        state.dead = dead
        if ok:
            state.failures, state.last_error, state.failing_since = 0, "", 0.0
            if not state.healthy:
                log.info("replica %s joins the pool", state.name)
                state.healthy, state.changed_at = True, time.monotonic()
        else:
            state.failures += 1
            state.last_error = error[:200]
            state.failing_since = state.failing_since or now
            if state.healthy and (dead or state.failures >= self.cfg.health.failures_to_eject):
                log.warning("replica %s leaves the pool: %s", state.name, state.last_error)
                state.healthy, state.changed_at = False, time.monotonic()
            hung = silent and now - state.failing_since >= self.cfg.health.hung_after_s
            if (dead or hung) and not state.healthy:
                for watch in list(state.watches):
                    watch.fire()
        if self.metrics is not None:
            self.metrics.replica_healthy.labels(replica=state.name).set(1 if state.healthy else 0)

    async def check(self, client: httpx.AsyncClient, state: ReplicaState) -> None:
        path = state.replica.health_path or self.cfg.health.path
        timeout = self.cfg.health.timeout_s
        try:
            async with asyncio.timeout(timeout):
                resp = await client.get(state.replica.url + path, timeout=timeout, headers=state.auth_headers())
            self.set_health(state, resp.status_code == 200, f"{path} answered {resp.status_code}")
        except (httpx.TimeoutException, TimeoutError) as err:
            self.set_health(state, False, f"{path}: no answer in {timeout:g} s ({type(err).__name__})", silent=True)
        except httpx.HTTPError as err:
            self.set_health(state, False, f"{path}: {type(err).__name__} {err}".strip(), dead=True)

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, s) for s in list(self.replicas.values())))

    async def run_checks(self, client: httpx.AsyncClient) -> None:
        """Forever: check every replica each health.interval_s (cancelled at shutdown)."""
        while True:
            started = time.monotonic()
            await self.check_all(client)
            await asyncio.sleep(max(0.0, self.cfg.health.interval_s - (time.monotonic() - started)))
