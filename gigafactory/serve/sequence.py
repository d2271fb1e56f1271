"""One request in flight: its prompt, sampling settings, generated ids, and the text it has released so far."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from gigafactory.inference.sampling import SamplingParams

_ids = itertools.count()


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
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _text: str = ""  # decoded output so far
    _released: int = 0  # characters of _text already sent to the client

    def __post_init__(self):
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # any int; same stream as generate() for 0 <= seed < 2**63

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is written (prompt + all outputs but the newest)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token_id: int, eos_id: int, max_len: int) -> None:
        """Record a sampled token, release the text that can no longer become a stop string, maybe finish."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token_id == eos_id and not self.ignore_eos:
            return self._finish("stop")
        self.output_ids.append(token_id)
        self._text = self.tokenizer.decode(self.output_ids)
        if self._text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return self._limit(max_len)
        hits = [i for i in (self._text.find(s, max(0, self._released - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self._release(min(hits))
            return self._finish("stop")
        held = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self._text.endswith(s[:k])), default=0)
        self._release(len(self._text) - held)
        self._limit(max_len)

    def _limit(self, max_len: int) -> None:
        if len(self.output_ids) >= self.params.max_tokens or self.length >= max_len:
            if self.finish_reason is None:
                self._release(len(self._text))
                self._finish("length")

    def _release(self, upto: int) -> None:
        if upto > self._released:
            self.on_event(self._text[self._released:upto], None)
            self._released = upto

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.on_event("", reason)

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "abort"
