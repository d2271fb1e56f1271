"""From an admitted request to its HTTP answer: submit to the engine, then one JSON body or a server-sent stream.

A request that ends badly ends alone: an engine error or a passed deadline is this request's 500/504 (or an error
event in its stream); a client that goes away aborts its own sequence and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from functools import lru_cache

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer

from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine, QueueFull
from gigafactory.serve.protocol import ApiError
from gigafactory.serve.sequence import Sequence
from gigafactory.serve.tools import ToolCallReader

QUEUE_FULL_RETRY_S = 2


def _failure(finish: str, text: str, timeout_s: float | None) -> ApiError:
    if finish == "timeout":
        return ApiError(504, f"the request did not finish within the server's deadline of {timeout_s:g} s; "
                             "ask for fewer tokens or retry later", code="timeout")
    return ApiError(500, text or "generation failed", code="generation_failed")


async def respond(request: Request, state, engine: Engine, req, ids: list[int], params: SamplingParams,
                  stop: list[str], chat: bool, started: float, stop_ids: frozenset[int] = frozenset(),
                  tool_names: list[str] | None = None):
    """Submit the request (n sequences for n choices, seeds seed+i, each with its own grammar state) and answer it,
    streamed or whole. `started` is time.perf_counter() at arrival. One failing choice fails the request; the
    others are aborted with it. `tool_names`: the answer may be a call of these functions (serve/tools.py)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = started + state.request_timeout if state.request_timeout else None
    k = req.top_logprobs_k()

    def callback(index: int):
        if engine.delivers_on_loop:  # the engine process's client already calls back on this loop
            return lambda text, fin: events.put_nowait((index, text, fin))
        return lambda text, fin: loop.call_soon_threadsafe(events.put_nowait, (index, text, fin))

    seqs = []
    try:
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            own = params  # the grammar's state is per sequence: every choice after the first gets a fresh one
            if params.constraint is not None and i:
                own = replace(params, constraint=params.constraint.fresh())
            seqs.append(engine.submit(ids, own, callback(i), stop, seed, req.ignore_eos, k, deadline, stop_ids))
    except QueueFull as err:
        for seq in seqs:
            engine.abort(seq)
        state.metrics.rejected.inc(model=engine.name)
        raise ApiError(503, f"the server is at capacity ({err}); retry in {QUEUE_FULL_RETRY_S} s", code="overloaded",
                       headers={"Retry-After": str(QUEUE_FULL_RETRY_S)}) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
    fmts = [_Formatter(engine.tokenizer, seq, chat, i, ToolCallReader(tool_names) if tool_names else None)
            for i, seq in enumerate(seqs)]

    def usage():
        n = sum(len(seq.output_ids) for seq in seqs)
        return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

    def finished(finish: str) -> None:
        state.metrics.latency.observe(time.perf_counter() - started, model=engine.name)
        if finish in ("error", "timeout"):
            state.metrics.errors.inc(type=finish)

    def abort_all() -> None:
        for seq in seqs:
            engine.abort(seq)  # a client that went away frees its slots; no-op once finished

    if req.stream:
        async def sse():
            def chunk(choices, **extra) -> str:
                obj = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": engine.name,
                       "choices": choices, **extra}
                return f"data: {json.dumps(obj)}\n\n"
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(len(seqs))])
                running = len(seqs)
                while running:
                    batch = [await events.get()]
                    while not events.empty():  # every token already queued goes out in this one chunk
                        batch.append(events.get_nowait())
                    failure = next(((text, finish) for _, text, finish in batch if finish in ("error", "timeout")),
                                   None)
                    if failure is not None:
                        finished(failure[1])
                        yield f"data: {json.dumps(_failure(failure[1], failure[0], state.request_timeout).body())}\n\n"
                        break
                    out = []
                    for i, text, finish in _merge(batch):
                        piece = fmts[i].choice(text, finish, delta=True)
                        if piece.get("delta", True) or piece["finish_reason"] or piece["logprobs"]:  # a call's
                            out.append(chunk([piece]))  # fixed opening adds nothing until its name is complete
                        running -= finish is not None
                        if not running:
                            finished(finish)
                            if req.include_usage():
                                out.append(chunk([], usage=usage()))
                    if out:
                        yield "".join(out)
                yield "data: [DONE]\n\n"
            finally:
                abort_all()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    pieces: list[list[str]] = [[] for _ in seqs]
    finishes: list[str | None] = [None] * len(seqs)
    checked = time.monotonic()
    try:
        while None in finishes:
            try:
                i, text, finish = await asyncio.wait_for(events.get(), timeout=0.25)
                pieces[i].append(text)
                finishes[i] = finish
                if finish in ("error", "timeout"):
                    break
            except TimeoutError:
                pass
            if time.monotonic() - checked >= 0.25:  # has the client gone? (every 0.25 s)
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
    finally:
        abort_all()
    failed = next((i for i, f in enumerate(finishes) if f in ("error", "timeout")), None)
    finished(finishes[failed] if failed is not None else "stop")
    if failed is not None:
        return _failure(finishes[failed], pieces[failed][-1], state.request_timeout).response()
    return {"id": rid, "object": kind, "created": created, "model": engine.name,
            "choices": [fmt.choice("".join(p), f, delta=False) for fmt, p, f in zip(fmts, pieces, finishes)],
            "usage": usage()}


def _merge(batch: list[tuple[int, str, str | None]]) -> list[tuple[int, str, str | None]]:
    """Queued events folded per choice: one piece of text each (with its finish reason if it came), in order."""
    text: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    for i, piece, fin in batch:
        text.setdefault(i, []).append(piece)
        if fin is not None:
            finish[i] = fin
    return [(i, "".join(pieces), finish.get(i)) for i, pieces in text.items()]


class _Formatter:
    """OpenAI's choice objects, with logprobs when asked: chat's `content` list, or completions' legacy columns; with
    tools, the text read as a call when it is one."""

    def __init__(self, tokenizer: Tokenizer, seq: Sequence, chat: bool, index: int = 0,
                 tools: ToolCallReader | None = None):
        self.tokenizer, self.seq, self.chat, self.index, self.tools = tokenizer, seq, chat, index, tools
        self.sent = 0  # logprob entries already sent (streaming)
        self.offset = 0  # characters already sent (completions' text_offset)

    def choice(self, text: str, finish: str | None, delta: bool) -> dict:
        logprobs = self._logprobs()
        if not self.chat:
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if delta:
            body, finish = self.tools.feed(text, finish) if self.tools else ({"content": text} if text else {}, finish)
            return {"index": self.index, "delta": body, "logprobs": logprobs, "finish_reason": finish}
        message, finish = (self.tools.message(text, finish) if self.tools
                           else ({"role": "assistant", "content": text}, finish))
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self) -> dict | None:
        """The entries of the tokens generated since the last call (all of them for a whole answer)."""
        seq = self.seq
        if seq.logprobs is None:
            return None
        upto = min(len(seq.token_logprobs), len(seq.output_ids))  # [EOS] is not an output token
        entries, self.sent = seq.token_logprobs[self.sent:upto], upto
        tok = self.tokenizer
        if self.chat:
            return {"content": [{"token": _text(tok, t), "logprob": lp, "bytes": _bytes(tok, t),
                                 "top_logprobs": [{"token": _text(tok, i), "logprob": v, "bytes": _bytes(tok, i)}
                                                  for i, v in top]} for t, lp, top in entries]}
        offsets = []
        for t, _, _ in entries:
            offsets.append(self.offset)
            self.offset += len(_text(tok, t))
        return {"tokens": [_text(tok, t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{_text(tok, i): v for i, v in top} for _, _, top in entries], "text_offset": offsets}


@lru_cache(maxsize=1 << 16)
def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


@lru_cache(maxsize=1 << 16)
def _bytes(tokenizer: Tokenizer, token: int) -> list[int]:
    """The token's own bytes (a byte-level token may be part of a character, which its text cannot show)."""
    piece = tokenizer.id_to_token(token) or ""
    raw = [_UNICODE_TO_BYTE.get(c) for c in piece]
    return raw if piece and None not in raw else list(_text(tokenizer, token).encode("utf-8"))


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character a byte-level BPE uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_level_alphabet()
