"""Forward one request to a replica and relay its answer, retrying on another replica while nothing was sent.

A request is retried (on a replica not tried yet, up to routing.max_attempts) when its replica is unreachable, answers
5xx, or fails before its first byte; when every attempt got a 5xx, the last one is the answer (a full queue's 503 and
Retry-After say more than the gateway could). A replica silent for routing.read_timeout_s is a 504, not retried. A non-streamed answer is read whole before anything reaches the client, so it is
always retryable. A stream is committed at the replica's first byte; if the replica fails after that, the client
gets one error event in OpenAI's shape and `data: [DONE]`, never a hang or a half-written event (events are relayed
whole). Every attempt on the canary pool is reported to the canary controller.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gigafactory.gateway import router
from gigafactory.gateway.pool import Pool, ReplicaLost, ReplicaState, Watch
from gigafactory.gateway.usage import UsageMeter

REPLICA_HEADER = "X-Gateway-Replica"
log = logging.getLogger(__name__)


class GatewayError(Exception):
    """A refusal or failure of the gateway itself, answered in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"), "param": None,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Route:
    region: str
    pool: str
    canary: bool  # attempts count for the region's SLO window
    affinity: str | None
    meter: UsageMeter | None = None  # the request's token count (quotas, /metrics), fed from the answer


class Proxy:
    def __init__(self, pool: Pool, controller, metrics, client: httpx.AsyncClient):
        self.pool, self.controller, self.metrics, self.client = pool, controller, metrics, client

    async def forward(self, path: str, body: dict, route: Route, started: float) -> Response:
        routing = self.pool.cfg.routing
        tried: set[str] = set()
        failures: list[str] = []
        last_answer: Response | None = None  # the last replica's own 5xx, returned if no replica does better
        for _ in range(routing.max_attempts):
            state = router.choose(self.pool.candidates(route.region, route.pool), route.affinity, routing.affinity_slack, tried)
            if state is None:
                break
            if tried:
                self.metrics.retries.inc()
            tried.add(state.name)
            result = await self._attempt(state, path, body, route, started)
            if isinstance(result, Response):
                if result.status_code < 500:
                    return result
                last_answer = result
                failures.append(f"{state.name} answered {result.status_code}")
            else:
                failures.append(result)
        if last_answer is not None:  # e.g. every replica's queue is full: its own 503 and Retry-After say it best
            return last_answer
        if not tried:
            why = f"no healthy replica of pool '{route.pool}' for region {route.region}"
        else:
            why = f"every replica tried failed ({'; '.join(failures)[:500]})"
        raise GatewayError(503, f"{why}; retry shortly", "upstream_unavailable", {"Retry-After": "1"})

    def _begin(self, state: ReplicaState) -> Watch:
        state.outstanding += 1
        state.assigned += 1
        self.metrics.outstanding.labels(replica=state.name).set(state.outstanding)
        return Watch(state)

    def end(self, state: ReplicaState, watch: Watch) -> None:
        watch.close()
        state.outstanding -= 1
        self.metrics.outstanding.labels(replica=state.name).set(state.outstanding)

    def outcome(self, state: ReplicaState, route: Route, outcome: str, latency: float | None) -> None:
        self.metrics.attempts.labels(replica=state.name, outcome=outcome).inc()
        if latency is not None and outcome in ("ok", "client_error"):
            self.metrics.first_byte.labels(pool=state.replica.pool).observe(latency)
        if route.canary and state.replica.pool == route.pool and outcome != "client_gone":
            self.controller.record(route.region, outcome in ("ok", "client_error"), latency)

    def lost(self, state: ReplicaState, err: Exception) -> str:
        """The replica could not be reached or broke off: out of the pool now, with every wait on it cut (a passing
        check brings it back). ReplicaLost: that already happened."""
        if isinstance(err, (httpx.ConnectTimeout, httpx.PoolTimeout)):  # slow to accept: maybe only busy
            self.pool.set_health(state, False, f"{type(err).__name__}: {err}", silent=True)
        elif not isinstance(err, ReplicaLost):
            self.pool.set_health(state, False, f"{type(err).__name__}: {err}", dead=True)
        return f"{state.name}: {type(err).__name__}"

    async def _attempt(self, state: ReplicaState, path: str, body: dict, route: Route, started: float) -> Response | str:
        """The relayed answer, or a string saying why this replica failed (the caller tries another)."""
        watch = self._begin(state)
        upstream, handed_over = None, False
        try:
            payload = dict(body, model=state.replica.model)
            routing = self.pool.cfg.routing  # per request, so a reload's timeouts apply at once
            content = json.dumps(payload).encode()  # ASCII escapes: a client's lone surrogate reaches the replica as sent
            request = self.client.build_request("POST", state.replica.url + path, content=content,
                                                headers={**state.auth_headers(), "content-type": "application/json"},
                                                timeout=httpx.Timeout(routing.read_timeout_s, connect=routing.connect_timeout_s))
            async with watch:
                upstream = await self.client.send(request, stream=True)
            headers = {REPLICA_HEADER: state.name}
            if "retry-after" in upstream.headers:
                headers["Retry-After"] = upstream.headers["retry-after"]
            kind = upstream.headers.get("content-type", "application/json")
            if upstream.status_code >= 500:  # the caller tries another replica, and keeps this answer as the last word
                async with watch:
                    content = await upstream.aread()
                self.outcome(state, route, "server_error", None)
                return Response(content, status_code=upstream.status_code, media_type=kind, headers=headers)
            chunks = upstream.aiter_raw()
            async with watch:
                first = await anext(chunks, b"")
            latency = time.monotonic() - started
            if not kind.startswith("text/event-stream"):
                async with watch:
                    content = first + b"".join([c async for c in chunks])
                self.outcome(state, route, "ok" if upstream.status_code < 400 else "client_error", latency)
                if route.meter is not None and upstream.status_code < 400:
                    route.meter.read_answer(content)
                return Response(content, status_code=upstream.status_code, media_type=kind, headers=headers)
            handed_over = True
            return RelayResponse(self, state, watch, route, upstream, first, chunks, latency, headers)
        except httpx.ReadTimeout:  # silent for read_timeout_s: another replica would make the client wait as long again
            self.outcome(state, route, "timeout", None)
            raise GatewayError(504, f"replica {state.name} sent nothing for {self.pool.cfg.routing.read_timeout_s:g} s",
                               "timeout") from None
        except (httpx.HTTPError, ReplicaLost) as err:
            self.outcome(state, route, "unreachable", None)
            return self.lost(state, err)
        finally:
            if not handed_over:
                if upstream is not None:
                    await upstream.aclose()
                self.end(state, watch)


def error_event(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class RelayResponse(StreamingResponse):
    """A replica's event stream relayed event by event; owns the upstream response and the replica's in-flight count
    until the stream ends or the client goes away."""

    def __init__(self, proxy: Proxy, state: ReplicaState, watch: Watch, route: Route, upstream: httpx.Response,
                 first: bytes, chunks, latency: float, headers: dict):
        self.proxy, self.state, self.watch, self.route, self.upstream = proxy, state, watch, route, upstream
        self.latency, self.closed, self.recorded = latency, False, False
        super().__init__(self._relay(first, chunks), status_code=upstream.status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **headers})

    def _record(self, outcome: str) -> None:
        if not self.recorded:
            self.recorded = True
            self.proxy.outcome(self.state, self.route, outcome, self.latency if outcome == "ok" else None)

    def _events(self, block: bytes) -> bytes:
        """Whole events on their way to the client, through the request's usage meter (which may take its usage
        chunk out)."""
        return self.route.meter.relay(block) if self.route.meter is not None else block

    async def _relay(self, first: bytes, chunks):
        pending = first
        try:
            while True:
                cut = pending.rfind(b"\n\n")
                if cut >= 0:  # whole events only: a failure later never leaves a half-written one behind
                    events = self._events(pending[:cut + 2])
                    pending = pending[cut + 2:]
                    if events:
                        yield events
                async with self.watch:
                    chunk = await anext(chunks, None)
                if chunk is None:
                    break
                pending += chunk
            if pending:
                yield self._events(pending)
            self._record("ok")
        except (httpx.HTTPError, ReplicaLost) as err:
            why = self.proxy.lost(self.state, err)
            self._record("stream_broken")
            yield error_event(f"the replica serving this stream failed ({why}); the answer is incomplete, send it again",
                              "upstream_failed")
        except Exception as err:  # a gateway bug: still a clean end for the client, and in the log
            log.exception("relaying a stream from %s failed", self.state.name)
            self._record("stream_broken")
            yield error_event(f"internal gateway error ({type(err).__name__}); send the request again", "internal_error")

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._record("client_gone")
        if self.route.meter is not None:
            self.route.meter.settle()  # the usage it reported, or an estimate when the stream was cut short
        try:
            await self.upstream.aclose()
        finally:
            self.proxy.end(self.state, self.watch)
