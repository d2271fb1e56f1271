"""The engine: a loop thread running scheduler -> model runner steps, and a thread-safe submit/abort API.

Failures are per request: a prefill, a sampling call or a client callback that raises ends that request with an
error and nothing else; a batched forward that raises is retried one sequence at a time so only the culprit fails.
Only a failure outside any request (the scheduler itself) ends every request in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from gigafactory.data.tokenizer import EOS_ID, plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams
from gigafactory.models import GrokModel
from gigafactory.serve.kv_cache import BLOCK_SIZE, PagedKVCache, blocks_for
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.model_runner import ModelRunner
from gigafactory.serve.scheduler import Scheduler
from gigafactory.serve.sequence import Sequence

log = logging.getLogger(__name__)


def check_kv_blocks(kv_blocks: int | None, max_len: int) -> None:
    """A pool smaller than one full context would leave a full-length request waiting forever."""
    if kv_blocks is not None and kv_blocks < blocks_for(max_len):
        raise UserError(f"kv_blocks={kv_blocks} cannot hold one full context of {max_len} tokens "
                        f"({blocks_for(max_len)} blocks of {BLOCK_SIZE})")


class QueueFull(Exception):
    """`max_waiting` requests are already waiting for a slot: the server answers 503 + Retry-After."""


class Engine:
    delivers_on_loop = False  # on_event runs on the engine thread (EngineClient: on the submitter's event loop)

    def __init__(self, model: GrokModel, tokenizer: Tokenizer, name: str, n_slots: int = 16,
                 metrics: Metrics | None = None, max_waiting: int = 256, prefix_cache: bool = True,
                 prefill_chunk: int = 512, kv_blocks: int | None = None):
        """n_slots: the most requests running together; kv_blocks: KV-cache blocks of 16 tokens (default: a full
        context per slot); prefill_chunk: prompt tokens per step."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.text_encoder = plain_text_encoder(tokenizer)  # for user text: never yields control tokens
        self.max_len = model.cfg.max_seq_len
        # An upper bound on the input bytes one token covers: text longer than max_len x this cannot fit the context.
        self.max_token_bytes = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1) or 1
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        device = next(model.parameters()).device
        check_kv_blocks(kv_blocks, self.max_len)
        self.kv = PagedKVCache(model.cfg, n_slots, self.max_len, device, dtype=next(model.parameters()).dtype,
                               n_blocks=kv_blocks)
        self.scheduler = Scheduler(self.kv, prefix_cache=prefix_cache)
        self.runner = ModelRunner(model, self.kv, self.scheduler.prefix)
        self.metrics = metrics or Metrics()
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)

    def start(self) -> "Engine":
        if self._thread.ident is None:  # starting twice (the CLI, then the server's lifespan) is a no-op
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[str, str | None], None],
               stop: list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
               logprobs: int | None = None, deadline: float | None = None,
               stop_ids: frozenset[int] = frozenset()) -> Sequence:
        """Queue a request; `on_event(text_delta, finish_reason)` is called from the engine thread. `deadline` is a
        time.perf_counter() value after which the request ends with finish reason "timeout". Raises QueueFull."""
        seq = Sequence(list(prompt_ids), params, self.tokenizer, on_event, stop or [], seed, ignore_eos, logprobs,
                       stop_ids)
        seq.deadline = deadline
        with self._submit_lock:
            if self.backlog >= self.max_waiting:
                raise QueueFull(f"{self.backlog} requests are already waiting for a slot of model '{self.name}'")
            self._inbox.put(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop generating for this request (client gone); its row is freed at the next step."""
        seq.abort()
        self._wake.set()

    @property
    def queue_length(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    @property
    def backlog(self) -> int:
        """Requests that will still wait once every free row is taken: what the queue bound limits (a burst that
        free rows can absorb is not refused)."""
        return max(0, self.queue_length - self.kv.n_free)

    @property
    def n_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            if not self.run_once():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def run_once(self) -> bool:
        """One turn of the loop: take new requests, end expired ones, step if there is work. False when idle (the
        caller waits for work: the thread on its wake event, the engine process on its pipe)."""
        try:
            while not self._inbox.empty():
                self.scheduler.add(self._inbox.get_nowait())
            self._expire()
            self.scheduler.retire()
            if self.scheduler.idle:
                self.metrics.engine_state(self.name, self.queue_length, self.n_running,
                                          self.kv.blocks_in_use / self.kv.n_blocks, self.kv.blocks_in_use)
                return False
            self.step()
        except Exception as err:  # outside any one request: end them all rather than hang every client
            log.exception("engine loop failed")
            message = f"engine failure: {type(err).__name__}"
            for seq in self.scheduler.running + list(self.scheduler.waiting):
                self._guard(seq, lambda s=seq: s.fail(message))
            self.scheduler.retire()
        return True

    def _expire(self) -> None:
        now = time.perf_counter()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.deadline is not None and seq.finish_reason is None and now > seq.deadline:
                self._guard(seq, lambda s=seq: s.expire())

    def step(self) -> None:
        """One engine step: plan up to `prefill_chunk` prompt tokens of admitted sequences (in arrival order), then
        one forward for those chunks and one token of every running sequence that has its first token, then sample."""
        t0 = time.perf_counter()
        self.scheduler.admit()
        budget = self.prefill_chunk  # prompt tokens per step: a long prompt is spread over steps, decodes go on
        for seq in [s for s in self.scheduler.running if s.finish_reason is None and s.prefilled < len(s.prompt_ids)]:
            if budget <= 0:
                break
            planned = [0]
            self._guard(seq, lambda s=seq: planned.__setitem__(0, self.runner.prefill(s, budget)))
            budget -= max(1, planned[0])
        decoding = [s for s in self.scheduler.running if s.finish_reason is None and s.output_ids]
        sampled = self._forward(decoding) if decoding or self.runner.planned else []
        if sampled:
            seqs = [seq for seq, _ in sampled]
            logits_NV = torch.stack([logits for _, logits in sampled])
            # one op for the plain greedy rows, if any
            greedy = logits_NV.argmax(-1).tolist() if any(s.params.plain_greedy for s in seqs) else [None] * len(seqs)
            plain = self._batch_sample(seqs, logits_NV)  # a few ops for the plain-temperature rows
            for seq, logits, g, token in zip(seqs, logits_NV, greedy, plain):
                self._guard(seq, lambda s=seq, lg=logits, g=g, t=token:
                            self._accept(s, self.runner.sample(s, lg, g) if t is None else t))
        self.scheduler.retire()
        self.metrics.step(self.name, time.perf_counter() - t0, len(sampled), self.queue_length, self.n_running,
                          self.kv.blocks_in_use / self.kv.n_blocks, self.kv.blocks_in_use)

    def _batch_sample(self, seqs: list[Sequence], logits_NV: torch.Tensor) -> list[int | None]:
        try:
            return self.runner.sample_batch(seqs, logits_NV)
        except Exception:  # each row on its own instead, so a failure is its request's alone
            log.exception("batched sampling failed; sampling %d requests one by one", len(seqs))
            return [None] * len(seqs)

    def _forward(self, decoding: list[Sequence]) -> list[tuple[Sequence, torch.Tensor]]:
        """(sequence, its logits) for each sequence that samples this step and whose forward succeeded."""
        try:
            return self.runner.decode(decoding)
        except Exception:
            log.exception("batched forward failed; running its %d chunks and %d decodes one by one",
                          len(self.runner.planned), len(decoding))
        planned, self.runner.planned = self.runner.planned, []
        out: list[tuple[Sequence, torch.Tensor]] = []
        for chunk in planned:
            self._guard(chunk.seq, lambda c=chunk: out.extend(self.runner.forward_alone(c)))
        for seq in decoding:
            self._guard(seq, lambda s=seq: out.append((s, self.runner.decode_one(s))))
        return out

    def _guard(self, seq: Sequence, work: Callable[[], None]) -> None:
        """Run one request's work; if it raises, that request (only) ends with an error."""
        try:
            work()
        except Exception as err:
            log.exception("request %s failed", seq.id)
            self.metrics.errors.inc(type="engine_" + type(err).__name__)
            try:
                seq.fail(f"generation failed: {type(err).__name__}")
            except Exception:  # its callback is what broke: mark it finished so its row is freed
                seq.finish_reason = "error"

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.finish_reason is not None:  # aborted during this step
            return
        first = seq.first_token_at is None
        if first:  # its prompt is in
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids), model=self.name)
            self.metrics.prefix_cached_tokens.inc(seq.cached_tokens, model=self.name)
        else:
            self.metrics.inter_token.observe(time.perf_counter() - seq.last_token_at, model=self.name)
        seq.append(token, EOS_ID, self.max_len)
        self.metrics.generation_tokens.inc(1, model=self.name)
        if first:
            self.metrics.ttft.observe(seq.first_token_at - seq.arrived, model=self.name)
