"""In-process stand-ins for replicas: one ASGI app answering for every fake host, each with its own failure rate,
reached through httpx's ASGITransport (no sockets, no model)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gigafactory.gateway.app import Gateway, create_app
from gigafactory.gateway.config import parse_config


class FakeFleet:
    def __init__(self, seed: int = 0):
        self.fail_rate: dict[str, float] = {}  # host -> share of requests answered 500
        self.down: set[str] = set()  # hosts whose /ready fails
        self.hung: set[str] = set()  # hosts that never answer anything (a stopped process, a partition)
        self.abandoned = 0  # requests whose gateway side went away while a host was holding them
        self.served: list[tuple[str, str]] = []  # (host, model sent upstream)
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
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {host}"},
                                 "finish_reason": "stop"}]}


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
