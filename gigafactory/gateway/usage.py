"""How many tokens one request used, read from the replica's own answer, for token quotas and /metrics.

A non-streamed answer carries `usage`. A stream carries it only in a final chunk (`"choices": [], "usage": {...}`)
that OpenAI-compatible servers (ours, vLLM, SGLang) send when asked with `stream_options.include_usage`; so every
streamed request is forwarded with it, and when the client did not ask for it the usage is taken out of the stream
again (the chunk dropped, or the field removed from a chunk that also carries choices), so the client sees the
stream it asked for. An answer without usage (a stream cut short by a failed replica or a departed client, a backend
that does not report it) is charged an estimate: the request body's characters / 4 for the prompt, and one token per
relayed chunk (servers send about one each) or the answer's characters / 4 for the completion.
"""

from __future__ import annotations

import json
from collections.abc import Callable

CHARS_PER_TOKEN = 4  # the estimate's prompt size: request characters per token
Charge = Callable[[int, int, bool], None]  # (prompt tokens, completion tokens, estimated)


def token_counts(usage) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI `usage` object, or None when it is missing or malformed."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)):
        return None
    return prompt, completion


class UsageMeter:
    """One request's token count: asks the replica for usage, reads it from the answer, charges it once."""

    def __init__(self, body: dict, charge: Charge):
        self.charge = charge
        self.streamed = body.get("stream") is True
        options = body.get("stream_options")
        self.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.prompt_estimate = max(1, len(json.dumps(body)) // CHARS_PER_TOKEN)
        self.reported: tuple[int, int] | None = None
        self.chunks = 0  # data events relayed (the completion estimate when no usage arrives)
        self.settled = False

    def upstream_body(self, body: dict) -> dict:
        """The body sent to replicas: a stream asks for its usage. A stream_options that is not an object is left
        as sent, for the replica to refuse in its own words."""
        options = body.get("stream_options")
        if not self.streamed or not (options is None or isinstance(options, dict)):
            return body
        return dict(body, stream_options={**(options or {}), "include_usage": True})

    def read_answer(self, content: bytes) -> None:
        """A whole (non-streamed) answer: its usage, charged now."""
        try:
            self.reported = token_counts(json.loads(content).get("usage"))
        except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested past Python's stack
            pass
        self.chunks = len(content) // CHARS_PER_TOKEN  # the estimate, if there was no usage
        self.settle()

    def relay(self, block: bytes) -> bytes:
        """Whole SSE events from the replica -> what the client gets: usage noted, and stripped unless it was asked."""
        if b'"usage"' not in block:
            self.chunks += block.count(b"data:") - block.count(b"data: [DONE]")
            return block
        kept = []
        for event in block.split(b"\n\n"):
            if event.strip():
                event = self._event(event)
            if event is not None:
                kept.append(event)
        return b"\n\n".join(kept)

    def _event(self, event: bytes) -> bytes | None:
        data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            chunk = None
        if not isinstance(chunk, dict) or "usage" not in chunk:
            self.chunks += bool(data) and data != b"[DONE]"
            return event
        counts = token_counts(chunk["usage"])
        self.reported = counts or self.reported
        if chunk.get("choices"):
            self.chunks += 1
        if self.client_wants_usage:
            return event
        if counts and not chunk.get("choices"):
            return None  # the usage chunk the client did not ask for
        del chunk["usage"]
        return b"data: " + json.dumps(chunk).encode()

    def settle(self) -> None:
        """Charge the request once: the replica's usage, else (a stream cut short) the estimate."""
        if self.settled:
            return
        self.settled = True
        if self.reported is not None:
            self.charge(*self.reported, False)
        else:
            self.charge(self.prompt_estimate, self.chunks, True)
