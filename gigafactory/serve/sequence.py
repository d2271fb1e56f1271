"""One request in flight: its prompt, sampling settings, generated ids, and the text it has released so far.

Both per-token jobs cost O(new characters), never O(everything so far): detokenisation decodes only the last two
steps' tokens (vLLM's prefix/read offsets), and each stop string is matched by a Knuth-Morris-Pratt automaton whose
state - the longest prefix of the stop string ending the text - is also how much text must be held back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from gigafactory.inference.sampling import SamplingParams

MAX_STOP_CHARS = 1000  # per stop string; the server refuses longer ones
_ids = itertools.count()


class StopMatcher:
    """Incremental matching of one stop string (KMP)."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            k += stop[i] == stop[k]
            self.fail[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        s, k = self.stop, self.state
        while k and s[k] != char:
            k = self.fail[k - 1]
        k += s[k] == char
        if k == len(s):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


@dataclass
class Sequence:
    """A request inside the engine. `on_event(delta_text, finish_reason_or_None)` is called from the engine thread."""

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    on_event: Callable[[str, str | None], None]
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    stop_ids: frozenset[int] = frozenset()  # tokens that end the answer like [EOS] (chat: the role tokens)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV-cache blocks holding positions 0, 16, 32, ...
    block_keys: list[int] = field(default_factory=list)  # content keys of its full blocks written so far
    cached_tokens: int = 0  # prompt tokens whose keys/values the prefix cache provides (not prefilled)
    copy_from: int | None = None  # id of a running request whose prompt blocks it shares (None: none, or finished)
    kv_len: int = 0  # positions written to its blocks so far
    prefilled: int = 0  # prompt tokens in its blocks (a long prompt is prefilled in chunks over several steps)
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    deadline: float | None = None  # time.perf_counter() value; past it the engine ends the request ("timeout")
    _text: str = ""  # decoded output so far
    _released: int = 0  # characters of _text already sent to the client
    _prefix_offset: int = 0  # output_ids[_prefix_offset:_read_offset] decode to complete characters
    _read_offset: int = 0

    def __post_init__(self):
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # any int; same stream as generate() for 0 <= seed < 2**63
        self._matchers = [StopMatcher(s) for s in self.stop]

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is written (prompt + all outputs but the newest)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token_id: int, eos_id: int, max_len: int) -> None:
        """Record a sampled token, release the text that can no longer become a stop string, maybe finish."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if (token_id == eos_id or token_id in self.stop_ids) and not self.ignore_eos:
            return self._finish("stop")
        self.output_ids.append(token_id)
        delta = self._decode_new(final=False)
        if delta is None:  # half a multi-byte character: wait for the rest
            return self._limit(max_len)
        start = len(self._text)
        self._text += delta
        hit = None
        for i, char in enumerate(delta):
            for m in self._matchers:
                if m.feed(char):
                    begin = start + i + 1 - len(m.stop)
                    hit = begin if hit is None else min(hit, begin)
        if hit is not None:
            self._text = self._text[:max(hit, self._released)]
            self._release(len(self._text))
            return self._finish("stop")
        held = max((m.state for m in self._matchers), default=0)
        self._release(len(self._text) - held)
        self._limit(max_len)

    def _decode_new(self, final: bool) -> str | None:
        """The text of the tokens not yet decoded, or None while it ends in an incomplete character."""
        ids, tok = self.output_ids, self.tokenizer
        prefix = tok.decode(ids[self._prefix_offset:self._read_offset])
        text = tok.decode(ids[self._prefix_offset:])
        if not final and (len(text) <= len(prefix) or text.endswith("\ufffd")):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return text[len(prefix):]

    def _limit(self, max_len: int) -> None:
        if len(self.output_ids) >= self.params.max_tokens or self.length >= max_len:
            if self.finish_reason is None:
                if self._read_offset < len(self.output_ids):
                    self._text += self._decode_new(final=True)
                self._release(len(self._text))
                self._finish("length")

    def _release(self, upto: int) -> None:
        if upto > self._released:
            self.on_event(self._text[self._released:upto], None)
            self._released = upto

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.on_event("", reason)

    def fail(self, message: str) -> None:
        """End this request (only this one) with an error the client sees."""
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.on_event(message, "error")

    def expire(self) -> None:
        """The request's deadline passed: end it with finish reason "timeout"."""
        if self.finish_reason is None:
            self._finish("timeout")

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "abort"
