"""The gateway's FastAPI app: one OpenAI-compatible front door over the replicas of every region.

A request passes: API key (401) -> token quota, rate limit and daily quota (429 + Retry-After) -> region (from a trusted proxy's
header, else the key's region; 403 when it is no configured region) -> the rollout's pool for this user (403 when
none) -> body (413, 400) -> router and proxy (503 + Retry-After when no replica could take it). Admin routes
(Bearer admin key) report the fleet and drive the rollout: kill switch, resume, advance, rollback, reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from gigafactory.errors import UserError
from gigafactory.gateway.canary import Controller
from gigafactory.gateway.config import GatewayConfig, load_config
from gigafactory.gateway.metrics import GatewayMetrics
from gigafactory.gateway.pool import Pool
from gigafactory.gateway.proxy import GatewayError, Proxy, Route
from gigafactory.gateway.quota import TokenLedger, pod_share
from gigafactory.gateway.router import affinity_key
from gigafactory.gateway.usage import UsageMeter
from gigafactory.serve.access import DailyQuota, RateLimiter, find_key, load_keys, retry_after_header

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
ADMIN_ACTIONS = ("kill", "resume", "advance", "rollback")


@dataclass
class Gateway:
    cfg: GatewayConfig
    path: str | None = None  # the config file, re-read by reload()
    transport: httpx.AsyncBaseTransport | None = None  # tests: in-process backends
    clock: object = time.time
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)

    def __post_init__(self):
        self.keys = access_keys(self.cfg)
        self.limiter, self.quota = RateLimiter(pod_share(self.cfg.rate_limit, self.cfg.pods)), DailyQuota()
        self.tokens = TokenLedger(self.cfg.token_quota, self.cfg.pods, self.clock)
        self.pool = Pool(self.cfg, self.metrics)
        self.controller = Controller(self.cfg, self.clock, self.metrics)
        self.proxies = trusted_networks(self.cfg)
        self.proxy: Proxy | None = None

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP, POST /admin/reload). A broken file keeps everything as it was."""
        if not self.path:
            return False
        try:
            cfg = load_config(self.path)
            keys = access_keys(cfg)
        except UserError as err:
            log.error("gateway config not reloaded, keeping the previous one: %s", err)
            return False
        self.cfg, self.keys = cfg, keys
        self.limiter.default_rpm = pod_share(cfg.rate_limit, cfg.pods)
        self.tokens.update(cfg.token_quota, cfg.pods)
        self.proxies = trusted_networks(cfg)
        self.pool.update(cfg)
        self.controller.apply_config(cfg)
        log.info("gateway config reloaded from %s", self.path)
        return True

    def trusted(self, request: Request) -> bool:
        try:
            peer = ipaddress.ip_address(request.client.host) if request.client else None
        except ValueError:
            return False
        return peer is not None and any(peer in net for net in self.proxies)

    async def run_canary(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.slo.evaluate_every_s)
            self.controller.evaluate()


def trusted_networks(cfg: GatewayConfig) -> tuple:
    return tuple(ipaddress.ip_network(p, strict=False) for p in cfg.trusted_proxies)


def access_keys(cfg: GatewayConfig) -> dict:
    """The keys of cfg.api_keys (the environment's GIGAFACTORY_API_KEYS is not read: the file is the one source)."""
    keys = load_keys(cfg.api_keys or None, env="", quotas=True)
    if cfg.rate_limit and not keys:
        raise UserError(f"gateway config {cfg.source}: rate_limit limits requests per API key, and no key is configured; "
                        "set api_keys or drop rate_limit")
    quota = cfg.token_quota
    if (quota.tokens or quota.keys) and not keys:
        raise UserError(f"gateway config {cfg.source}: token_quota limits tokens per API key, and no key is configured; "
                        "set api_keys or drop token_quota")
    unknown = sorted(set(quota.keys) - {k.name for k in keys.values()})
    if unknown:  # a misspelled name would leave that key unlimited
        raise UserError(f"gateway config {cfg.source}: token_quota.keys names no key called {', '.join(unknown)[:200]}; "
                        "use the keys' `name` values from the key file")
    return keys


def create_app(gw: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(gw.cfg.routing.read_timeout_s, connect=gw.cfg.routing.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=gw.transport) as client:
            gw.proxy = Proxy(gw.pool, gw.controller, gw.metrics, client)
            await gw.pool.check_all(client)
            gw.controller.evaluate()
            tasks = [asyncio.create_task(gw.pool.run_checks(client)), asyncio.create_task(gw.run_canary())]
            if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gw.reload)
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="gigafactory gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.exception_handler(GatewayError)
    async def gateway_error(request, err: GatewayError):
        gw.metrics.refused.labels(code=err.code).inc()
        return err.response()

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return GatewayError(500, f"internal error ({type(err).__name__}); this is a gateway bug", "internal_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Ready while any replica is in the pool: a load balancer must not take the whole front door away because
        one pool (a canary, one region) is down; the body names the pools without a healthy replica."""
        healthy = {p: 0 for p in sorted(gw.cfg.pools())}
        for s in gw.pool.replicas.values():
            healthy[s.replica.pool] += s.healthy
        body = {"status": "ready" if any(healthy.values()) else "not ready", "healthy_replicas": healthy,
                "empty_pools": [p for p, n in healthy.items() if not n]}
        return JSONResponse(body, status_code=200 if any(healthy.values()) else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(gw.metrics.render(), media_type=GatewayMetrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(gw, request)
        return {"object": "list", "data": [{"id": p, "object": "model", "created": 0, "owned_by": "gigafactory"}
                                           for p in sorted(gw.cfg.pools())]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await proxied(gw, request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await proxied(gw, request, "/v1/completions")

    @app.get("/admin/status")
    async def admin_status(request: Request):
        admin(gw, request)
        return {"regions": gw.controller.status(), "replicas": [s.status() for s in gw.pool.replicas.values()]}

    @app.post("/admin/{action}")
    async def admin_action(action: str, request: Request):
        admin(gw, request)
        if action == "reload":
            return {"reloaded": gw.reload()}
        if action not in ADMIN_ACTIONS:
            raise GatewayError(404, f"unknown admin action '{action[:40]}'; use {', '.join(ADMIN_ACTIONS)} or reload", "not_found")
        raw = await read_json(request, allow_empty=True)
        region = raw.get("region")
        if region is not None and (not isinstance(region, str) or region.upper() not in gw.cfg.regions):
            raise GatewayError(400, f"region must be one of {', '.join(gw.cfg.regions)} (or absent for all)", "invalid_value")
        return {"decisions": gw.controller.act(action, region.upper() if region else None)}

    return app


def authenticate(gw: Gateway, request: Request):
    if not gw.keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = find_key(gw.keys, token.strip() if scheme.lower() == "bearer" else None)
    if key is None:
        raise GatewayError(401, "invalid or missing API key; send 'Authorization: Bearer YOUR_KEY'", "invalid_api_key")
    return key


def admin(gw: Gateway, request: Request) -> None:
    secret = gw.cfg.admin_key()
    if not secret:
        raise GatewayError(403, f"admin routes are off: set {gw.cfg.admin_key_env or 'admin_key_env'} to enable them", "admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret.encode()):
        raise GatewayError(401, "admin routes need 'Authorization: Bearer ADMIN_KEY'", "invalid_api_key")


def _no_constant(name: str):
    """NaN/Infinity: Python's json reads them, but the body could not be sent on to a replica as JSON."""
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, allow_empty: bool = False) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise GatewayError(413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", "body_too_large")
    data, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise GatewayError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes", "body_too_large")
            data.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody to answer, and not a gateway error
        raise GatewayError(400, "the client closed the connection before the body ended", "incomplete_body") from None
    if allow_empty and not size:
        return {}
    try:
        body = json.loads(b"".join(data), parse_constant=_no_constant)
    except RecursionError:
        raise GatewayError(400, "the body is nested too deeply", "invalid_json") from None
    except ValueError as err:
        raise GatewayError(400, f"the body is not valid JSON ({str(err)[:100]})", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object", "invalid_json")
    return body


async def unless_client_leaves(request: Request, forwarding) -> Response:
    """The forwarded answer, unless the client disconnects first (checked every 0.5 s): then the attempt is cancelled,
    which closes the upstream connection, so the replica aborts the request and frees its slot (a stream is already
    handled this way by its response once it has started)."""
    forward = asyncio.ensure_future(forwarding)

    async def gone():
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({forward, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not forward.done():
            forward.cancel()
    try:
        return await forward
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():  # we are being cancelled ourselves
            raise
        return Response(status_code=499)  # nobody is listening; the status is for the logs and /metrics


def admit(gw: Gateway, key) -> None:
    """The key's limits, in this order: its token quota (only looked at: a refused request uses no tokens), its rate
    (counted), its daily requests (counted). Each is this pod's share (config `pods`)."""
    wait = gw.tokens.check(key.secret, key.name)
    if wait:
        limit, window = gw.tokens.limit(key.name), gw.cfg.token_quota.window_s
        raise GatewayError(429, f"token quota of {limit} tokens per {window:g} s used for key '{key.name}'; "
                                f"retry in {retry_after_header(wait)} s", "token_quota_exceeded", {"Retry-After": retry_after_header(wait)})
    wait = gw.limiter.check(key.secret, pod_share(key.requests_per_minute, gw.cfg.pods))
    if wait:
        raise GatewayError(429, f"rate limit reached for key '{key.name}'; retry in {wait:.1f} s",
                           "rate_limit_exceeded", {"Retry-After": retry_after_header(wait)})
    per_day = pod_share(key.requests_per_day, gw.cfg.pods, whole=True)
    wait = gw.quota.check(key.secret, per_day)
    if wait:
        raise GatewayError(429, f"daily quota of {per_day} requests used for key '{key.name}'; it resets at 00:00 UTC",
                           "quota_exceeded", {"Retry-After": retry_after_header(wait)})


def charger(gw: Gateway, key, pool: str):
    """What a request's tokens are charged to: the key's token quota (when there is a key) and /metrics."""
    def charge(prompt: int, completion: int, estimated: bool) -> None:
        if key is not None:
            gw.tokens.debit(key.secret, prompt + completion)
        if estimated:
            gw.metrics.tokens.labels(pool=pool, kind="estimated").inc(prompt + completion)
        else:
            gw.metrics.tokens.labels(pool=pool, kind="prompt").inc(prompt)
            gw.metrics.tokens.labels(pool=pool, kind="completion").inc(completion)
    return charge


async def proxied(gw: Gateway, request: Request, path: str) -> Response:
    started = time.monotonic()
    region, pool, status = "none", "none", 500
    try:
        key = authenticate(gw, request)
        if key is not None:
            admit(gw, key)
        trusted = gw.trusted(request)
        claimed = (request.headers.get(gw.cfg.region_header) if trusted else None) or (key.region if key else None)
        found = gw.cfg.region_of(claimed)
        if found is None:
            raise GatewayError(403, f"Grok is not available in region {(claimed or 'unknown')[:20]}.", "not_in_rollout")
        region = found
        user = key.name if key else (request.headers.get(gw.cfg.user_header) if trusted else None)
        assignment = gw.controller.assign(region, user)
        if assignment.pool is None:
            raise GatewayError(403, assignment.reason, "not_in_rollout")
        pool = assignment.pool
        body = await read_json(request)
        meter = UsageMeter(body, charger(gw, key, pool))
        route = Route(region, pool, assignment.canary, affinity_key(body, user, gw.cfg.routing.prefix_chars), meter)
        body = meter.upstream_body(body)
        response = await unless_client_leaves(request, gw.proxy.forward(path, body, route, started))
        status = response.status_code
        return response
    except GatewayError as err:
        status = err.status
        raise
    finally:
        gw.metrics.requests.labels(region=region, pool=pool, status=str(status)).inc()
