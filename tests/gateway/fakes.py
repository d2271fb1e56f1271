"""In-process stand-ins for replicas: one ASGI app answering for every fake host, each with its own failure rate,
reached through httpx's ASGITransport (no sockets, no model)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gigafactory.gateway.app import Gateway, create_app
from gigafactory.gateway.config import parse_config


class FakeFleet:
    def __init__(self, seed: int = 0):
        self.fail_rate: dict[str, float] = {}  # host -> share of requests answered 500
        self.down: set[str] = set()  # hosts whose /ready fails
        self.hung: set[str] = set()  # hosts that never answer anything (a stopped process, a partition)
        self.abandoned = 0  # requests whose gateway side went away while a host was holding them
        self.served: list[tuple[str, str]] = []  # (host, model sent upstream)
        self.bodies: list[dict] = []  # every chat body received, as sent upstream
        self.completion_tokens = 5  # an answer's tokens (a stream sends one chunk each); its prompt's: its words
        self.rng = random.Random(seed)
        self.app = FastAPI()

        @self.app.get("/ready")
        async def ready(request: Request):
            await self.maybe_hang(request)
            return JSONResponse({}, status_code=503 if request.url.hostname in self.down else 200)

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request):
            host, body = request.url.hostname, await request.json()
            await self.maybe_hang(request, count=True)
            if self.rng.random() < self.fail_rate.get(host, 0.0):
                return JSONResponse({"error": {"message": "injected", "code": "generation_failed"}}, status_code=500)
            self.served.append((host, body["model"]))
            self.bodies.append(body)
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            usage = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                     "total_tokens": prompt + self.completion_tokens}
            if body.get("stream"):
                return StreamingResponse(self.stream(host, body, usage), media_type="text/event-stream")
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {host}"},
                                 "finish_reason": "stop"}], "usage": usage}


    async def stream(self, host: str, body: dict, usage: dict):
        """Like vLLM with include_usage: `usage: null` in every chunk, then a usage chunk with no choices."""
        asked = (body.get("stream_options") or {}).get("include_usage")
        for i in range(self.completion_tokens):
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": f"{host}{i} "}, "finish_reason": None}]}
            yield f"data: {json.dumps(dict(chunk, usage=None) if asked else chunk)}\n\n"
        if asked:
            yield f"data: {json.dumps({'id': 'x', 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def maybe_hang(self, request: Request, count: bool = False) -> None:
        try:
            while request.url.hostname in self.hung:
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.abandoned += count
            raise


@contextlib.asynccontextmanager
async def gateway_client(toml: str, fleet: FakeFleet, clock=None, base_dir=None, path=None):
    """(Gateway, httpx client talking to its app in-process), lifespan run (health checked once)."""
    cfg = parse_config(toml, "test.toml", base_dir)
    gw = Gateway(cfg, path=path, transport=httpx.ASGITransport(fleet.app), **({"clock": clock} if clock else {}))
    app = create_app(gw)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            yield gw, client
