"""The HTTP server: OpenAI-compatible completions and chat completions, models, health, metrics, the chat page.

Every request passes the same gate before it reaches an engine: API key (401) -> rate limit (429 + Retry-After) ->
rollout policy (403) -> JSON body and schema (400) -> model (404) -> prompt length and sampling values (400).
Anything a client can send wrong ends as a 4xx with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.access import ApiKey, RateLimiter, find_key, retry_after_header
from gigafactory.serve.chat_template import ChatTemplate
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, validation_error
from gigafactory.serve.rollout import RolloutPolicy

PAGE = Path(__file__).parent / "static" / "index.html"
MAX_BODY_BYTES = 1 << 20
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclass
class ServerState:
    engines: dict[str, Engine]
    default_model: str
    metrics: Metrics
    keys: dict[str, ApiKey] = field(default_factory=dict)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    rollout: RolloutPolicy | None = None


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
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code="not_found"
                        if err.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request, err):
        return validation_error(err).response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(state.engines)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _authenticate(state, request)
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "gigafactory"}
                                           for n in state.engines]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine, req = await _admit(state, request, CompletionRequest)
        if req.echo:
            raise ApiError(400, "echo=true is not supported; drop it", param="echo", code="unsupported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (a list of several strings is not supported)", param="prompt")
            prompt = prompt[0]
        ids = engine.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < engine.model.cfg.vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {engine.model.cfg.vocab_size})", param="prompt")
        return await _generate(request, engine, req, ids, req.max_tokens, [], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine, req = await _admit(state, request, ChatCompletionRequest)
        template = ChatTemplate(engine.tokenizer)
        text = template.render([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = engine.tokenizer.encode(text).ids
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await _generate(request, engine, req, ids, max_tokens, template.stop, chat=True)

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
        region = request.headers.get(policy.region_header) or (key.region if key else None) or ""
        user = request.headers.get(policy.user_header) or (key.name if key else None)
        decision = state.rollout.decide(region, user, time.monotonic())
        if not decision.admitted:
            raise ApiError(403, decision.reason, code="not_in_rollout")
        region_model = decision.model

    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON ({err}); send a JSON object", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = schema.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err) from None

    name = region_model or req.model or state.default_model
    if name not in state.engines:
        if region_model:
            raise ApiError(503, f"model '{name}' set for this region by the rollout policy is not loaded", code="model_not_loaded")
        raise ApiError(404, f"model '{name}' does not exist; available: {', '.join(state.engines)}", param="model",
                       code="model_not_found")
    return state.engines[name], req


async def _generate(request: Request, engine: Engine, req, ids: list[int], max_tokens: int | None, extra_stop: list[str],
                    chat: bool):
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported; use n=1 and send several requests", param="n")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported; drop the field", param="logprobs")
    if not ids:
        raise ApiError(400, "the prompt is empty; send at least one token of text", param="prompt")
    context = engine.max_len
    if len(ids) >= context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {context}; shorten it",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stop = req.stop_list()
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")
    room = context - len(ids)
    params = SamplingParams(req.temperature, req.top_k, req.top_p, room if max_tokens is None else max_tokens)
    try:
        params.validate()
    except UserError as err:
        raise ApiError(400, str(err), param=str(err).split("=")[0], code="invalid_value") from None
    if req.temperature > 2:
        raise ApiError(400, f"temperature={req.temperature} must be in [0, 2]", param="temperature", code="invalid_value")
    params.max_tokens = min(params.max_tokens, room)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    seq = engine.submit(ids, params, lambda text, fin: loop.call_soon_threadsafe(events.put_nowait, (text, fin)),
                        stop + extra_stop, req.seed, req.ignore_eos)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

    def usage():
        return {"prompt_tokens": len(ids), "completion_tokens": len(seq.output_ids),
                "total_tokens": len(ids) + len(seq.output_ids)}

    def choice(text: str, finish: str | None, delta: bool) -> dict:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    if req.stream:
        async def sse():
            def chunk(choices, **extra) -> str:
                obj = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": engine.name,
                       "choices": choices, **extra}
                return f"data: {json.dumps(obj)}\n\n"
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                while True:
                    text, finish = await events.get()
                    if finish == "error":
                        yield f"data: {json.dumps(ApiError(500, 'generation failed: ' + text).body())}\n\n"
                        break
                    if text or finish:
                        yield chunk([choice(text, finish, delta=True)])
                    if finish:
                        if req.include_usage():
                            yield chunk([], usage=usage())
                        break
                yield "data: [DONE]\n\n"
            finally:
                engine.abort(seq)  # a client that went away mid-stream frees its slot; no-op once finished

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    pieces, finish, checked = [], None, time.monotonic()
    try:
        while finish is None:
            try:
                text, finish = await asyncio.wait_for(events.get(), timeout=0.5)
                pieces.append(text)
            except TimeoutError:
                pass
            if finish is None and time.monotonic() - checked >= 0.25:  # has the client gone? (every 0.25 s)
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
    finally:
        engine.abort(seq)
    if finish == "error":
        return JSONResponse(ApiError(500, "generation failed: " + pieces[-1]).body(), status_code=500)
    return {"id": rid, "object": kind, "created": created, "model": engine.name,
            "choices": [choice("".join(pieces), finish, delta=False)], "usage": usage()}
