"""The replicas as the router sees them: healthy or not, and how many requests each has in flight.

A replica leaves the pool after `failures_to_eject` failed checks in a row (about that many seconds), or at once when a
proxied request finds it unreachable (connection refused or reset, a stalled read); a passing check brings it back.
Checks run concurrently, so one hung replica delays no other's verdict.

When it leaves because it cannot be reached (not because /ready said 503: a full queue still finishes its work), every
wait on it is cut short (Watch): a hung replica's requests go elsewhere or end cleanly within seconds, not after
routing.read_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """Wraps each wait of one request on one replica; `fire()` (the replica is unreachable) ends the current and any
    later wait with ReplicaLost. Costs no task per wait: an asyncio.timeout that is rescheduled to now."""

    def __init__(self, state: ReplicaState):
        self.state, self.lost, self._timeout = state, False, None

    def __enter__(self):
        self.state.watches.add(self)
        return self

    def __exit__(self, *exc):
        self.state.watches.discard(self)

    @contextlib.asynccontextmanager
    async def guard(self):
        if self.lost:
            raise ReplicaLost(self.state.name)
        try:
            async with asyncio.timeout(None) as self._timeout:
                yield
        except TimeoutError:
            if self.lost:
                raise ReplicaLost(self.state.name) from None
            raise
        finally:
            self._timeout = None

    def fire(self) -> None:
        self.lost = True
        if self._timeout is not None:
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
        """Healthy replicas of `pool` in `region`; with routing.cross_region, another region's when it has none."""
        own = [s for s in self.replicas.values() if s.healthy and s.replica.pool == pool and s.replica.region == region]
        if own or not self.cfg.routing.cross_region:
            return own
        return [s for s in self.replicas.values() if s.healthy and s.replica.pool == pool]

    def set_health(self, state: ReplicaState, ok: bool, error: str = "", eject_now: bool = False,
                   unreachable: bool = False) -> None:
        if ok:
            state.failures, state.last_error = 0, ""
            if not state.healthy:
                log.info("replica %s joins the pool", state.name)
                state.healthy, state.changed_at = True, time.monotonic()
        else:
            state.failures += 1
            state.last_error = error[:200]
            if state.healthy and (eject_now or state.failures >= self.cfg.health.failures_to_eject):
                log.warning("replica %s leaves the pool: %s", state.name, state.last_error)
                state.healthy, state.changed_at = False, time.monotonic()
            if unreachable and not state.healthy:
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
            ok, error, unreachable = resp.status_code == 200, f"{path} answered {resp.status_code}", False
        except (httpx.HTTPError, TimeoutError) as err:
            ok, error, unreachable = False, f"{path}: {type(err).__name__} {err}".strip(), True
        self.set_health(state, ok, error, unreachable=unreachable)

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, s) for s in list(self.replicas.values())))

    async def run_checks(self, client: httpx.AsyncClient) -> None:
        """Forever: check every replica each health.interval_s (cancelled at shutdown)."""
        while True:
            started = time.monotonic()
            await self.check_all(client)
            await asyncio.sleep(max(0.0, self.cfg.health.interval_s - (time.monotonic() - started)))
