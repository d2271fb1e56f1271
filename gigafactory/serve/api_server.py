"""The HTTP server: OpenAI-compatible completions and chat completions, models, health/ready, metrics, the page.

Every request passes the same gate before it reaches an engine: API key (401) -> rate limit (429 + Retry-After) ->
rollout policy (403) -> body size (413), JSON and schema (400) -> model (404) -> prompt length and sampling values
(400) -> queue bound (503 + Retry-After). Anything a client can send wrong ends as a 4xx with an OpenAI-style body;
anything that still breaks is a 500 in the same shape, counted in /metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.access import ApiKey, RateLimiter, find_key, retry_after_header
from gigafactory.serve.chat_template import ChatTemplate
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body, validation_error
from gigafactory.serve.responses import respond
from gigafactory.serve.rollout import RolloutPolicy
from gigafactory.serve.structured import response_format_constraint
from gigafactory.serve.tools import template_messages, tool_constraint, tool_mode

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "index.html"
MAX_BODY_BYTES = 1 << 20
ROUTES = ("/", "/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass
class ServerState:
    engines: dict[str, Engine]
    default_model: str
    metrics: Metrics
    keys: dict[str, ApiKey] = field(default_factory=dict)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    rollout: RolloutPolicy | None = None
    # Clients whose X-Region / X-User-Id headers are believed (your reverse proxy); everyone else's are ignored.
    trusted_proxies: tuple = LOOPBACK
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None = no deadline


def create_app(state: ServerState, start_engines: bool = True) -> FastAPI:
    async def lifespan(app):
        if start_engines:
            for engine in state.engines.values():
                engine.start()
        yield
        if start_engines:
            for engine in state.engines.values():
                engine.stop()

    app = FastAPI(title="gigafactory serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        state.metrics.errors.inc(type=err.code or err.TYPES.get(err.status, "api_error"))
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code="not_found"
                        if err.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request, err):
        return validation_error(err).response()

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):  # a bug: still one JSON answer in OpenAI's shape, counted
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        state.metrics.errors.inc(type="internal")
        return ApiError(500, f"internal error ({type(err).__name__}); this is a server bug", code="internal_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        """Liveness: the process answers. A load balancer restarts what fails this, nothing else."""
        return {"status": "ok", "models": list(state.engines)}

    @app.get("/ready")
    async def ready():
        """Readiness: every engine thread runs with its model loaded and its queue below the bound; a load balancer
        sends no new traffic while this is 503."""
        problems = [f"model '{n}': engine not running" for n, e in state.engines.items() if not e.alive]
        problems += [f"model '{n}': queue full ({e.backlog}/{e.max_waiting})" for n, e in state.engines.items()
                     if e.backlog >= e.max_waiting]
        body = {"status": "not ready" if problems else "ready", "problems": problems,
                "queues": {n: e.queue_length for n, e in state.engines.items()}}
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        _authenticate(state, request)
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "gigafactory"}
                                           for n in state.engines]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        engine, req = await _admit(state, request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (a list of several strings is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await _encode(engine, prompt, "prompt")
        else:
            ids = list(prompt)
            if any(not 0 <= t < engine.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
        params = _sampling(engine, req, ids, req.max_tokens, "prompt")
        params.constraint = await _constraint(engine, req)
        return await respond(request, state, engine, req, ids, params, req.stop_list(), False, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        engine, req = await _admit(state, request, ChatCompletionRequest)
        template = ChatTemplate(engine.tokenizer, engine.text_encoder)
        mode, tool_names = tool_mode(req)
        messages = template_messages(req, mode)
        _check_size(engine, sum(len(m["content"].encode()) for m in messages), "messages")
        ids = await asyncio.to_thread(template.encode, messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _sampling(engine, req, ids, max_tokens, "messages")
        params.constraint = await _constraint(engine, req, mode, tool_names)
        # with role tokens, one of them starting the next turn ends the answer (the model must not write the user's)
        stop_ids = frozenset(template.role_ids.values()) if template.special else frozenset()
        return await respond(request, state, engine, req, ids, params, req.stop_list() + template.stop, True, started,
                             stop_ids, tool_names)

    return app


class CountRequests:
    """Counts responses by endpoint and status. Plain ASGI (not @app.middleware, whose wrapped `receive` hides
    client disconnects from handlers) and it does not buffer streamed responses."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(endpoint=path, status=message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _authenticate(state: ServerState, request: Request) -> ApiKey | None:
    if not state.keys:
        return None
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    key = find_key(state.keys, token.strip() if scheme.lower() == "bearer" else None)
    if key is None:
        msg = "invalid API key" if auth else "missing API key; send the header 'Authorization: Bearer YOUR_KEY'"
        raise ApiError(401, msg, code="invalid_api_key")
    return key


def _from_trusted_proxy(state: ServerState, request: Request) -> bool:
    try:
        client = ipaddress.ip_address(request.client.host) if request.client else None
    except ValueError:
        return False
    return client is not None and any(client in net for net in state.trusted_proxies)


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused with 413 as soon as it is known to be too big: from Content-Length before reading a byte,
    or while streaming a chunked body."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody to answer, and not a server error
        raise ApiError(400, "the client closed the connection before the body ended", code="incomplete_body") from None
    return b"".join(chunks)


async def _admit(state: ServerState, request: Request, schema):
    """The gate: key, rate limit, rollout, body, model. Returns the engine to use and the parsed request."""
    key = _authenticate(state, request)
    if key is not None:
        wait = state.limiter.check(key.secret, key.requests_per_minute)
        if wait:
            state.metrics.rate_limited.inc(key=key.name)
            raise ApiError(429, f"rate limit reached for key '{key.name}'; retry in {wait:.1f} s", code="rate_limit_exceeded",
                           headers={"Retry-After": retry_after_header(wait)})
    region_model = None
    if state.rollout is not None:
        policy = state.rollout.policy
        trusted = _from_trusted_proxy(state, request)
        region = (request.headers.get(policy.region_header) if trusted else None) or (key.region if key else None) or ""
        # The identity is the key's when there is one; a header names the user only when a trusted proxy set it.
        user = key.name if key else (request.headers.get(policy.user_header) if trusted else None)
        decision = state.rollout.decide(region, user, time.monotonic())
        if not decision.admitted:
            raise ApiError(403, decision.reason, code="not_in_rollout")
        region_model = decision.model

    raw = parse_body(await _read_body(request))
    try:
        req = schema.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err) from None

    name = region_model or req.model or state.default_model
    if name not in state.engines:
        if region_model:
            raise ApiError(503, f"model '{name}' set for this region by the rollout policy is not loaded", code="model_not_loaded")
        raise ApiError(404, f"model '{name[:100]}' does not exist; available: {', '.join(state.engines)}", param="model",
                       code="model_not_found")
    return state.engines[name], req


def _check_size(engine: Engine, n_bytes: int, param: str) -> None:
    """Refuse, without tokenizing, text that cannot fit: every token covers at most `max_token_bytes` bytes."""
    if n_bytes > engine.max_len * engine.max_token_bytes:
        raise ApiError(400, f"the {param} is {n_bytes} bytes, more than this model's context of {engine.max_len} "
                            "tokens can hold; shorten it", param=param, code="context_length_exceeded")


async def _encode(engine: Engine, text: str, param: str) -> list[int]:
    """User text -> ids off the event loop (a long prompt must not stall every stream), never as control tokens."""
    _check_size(engine, len(text.encode()), param)
    return (await asyncio.to_thread(engine.text_encoder.encode, text)).ids


async def _constraint(engine: Engine, req, mode: str = "none", tool_names: list[str] = ()):
    """The grammar this answer must follow (tool call or response_format), compiled off the event loop; None if
    the answer is free text."""
    if mode != "none":
        return await asyncio.to_thread(tool_constraint, engine.tokenizer, req, mode, tool_names)
    if req.response_format is None or req.response_format.type == "text":
        return None
    if req.ignore_eos:
        raise ApiError(400, "'ignore_eos' cannot be combined with response_format: the answer ends where its grammar "
                            "does", param="ignore_eos", code="invalid_value")
    return await asyncio.to_thread(response_format_constraint, engine.tokenizer, req.response_format)


def _sampling(engine: Engine, req, ids: list[int], max_tokens: int | None, param: str) -> SamplingParams:
    if not ids:
        raise ApiError(400, "the prompt is empty; send at least one token of text", param=param)
    context = engine.max_len
    if len(ids) >= context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {context}; shorten it",
                       param=param, code="context_length_exceeded")
    room = context - len(ids)
    params = SamplingParams(req.temperature, req.top_k, req.top_p, room if max_tokens is None else max_tokens,
                            req.min_p, req.presence_penalty, req.frequency_penalty,
                            req.bias_ids(engine.vocab_size))
    try:
        params.validate()
    except UserError as err:
        raise ApiError(400, str(err), param=str(err).split("=")[0], code="invalid_value") from None
    params.max_tokens = min(params.max_tokens, room)
    return params
