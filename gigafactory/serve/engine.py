"""The engine: a loop thread running scheduler -> model runner steps, and a thread-safe submit/abort API."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from gigafactory.data.tokenizer import EOS_ID
from gigafactory.inference.sampling import SamplingParams
from gigafactory.models import GrokModel
from gigafactory.serve.kv_cache import SlotKVCache
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.model_runner import ModelRunner
from gigafactory.serve.scheduler import Scheduler
from gigafactory.serve.sequence import Sequence

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: GrokModel, tokenizer: Tokenizer, name: str, n_slots: int = 16,
                 metrics: Metrics | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_len = model.cfg.max_seq_len
        device = next(model.parameters()).device
        self.kv = SlotKVCache(model.cfg, n_slots, self.max_len, device, dtype=next(model.parameters()).dtype)
        self.runner = ModelRunner(model, self.kv)
        self.scheduler = Scheduler(self.kv)
        self.metrics = metrics or Metrics()
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[str, str | None], None],
               stop: list[str] | None = None, seed: int | None = None, ignore_eos: bool = False) -> Sequence:
        """Queue a request; `on_event(text_delta, finish_reason)` is called from the engine thread."""
        seq = Sequence(list(prompt_ids), params, self.tokenizer, on_event, stop or [], seed, ignore_eos)
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
    def n_running(self) -> int:
        return len(self.scheduler.running)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            while not self._inbox.empty():
                self.scheduler.add(self._inbox.get_nowait())
            self.scheduler.retire()
            if self.scheduler.idle:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as err:  # a failed step must not hang every client: end their requests with an error
                log.exception("engine step failed")
                for seq in self.scheduler.running + list(self.scheduler.waiting):
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.on_event(f"{type(err).__name__}: {err}", "error")
                self.scheduler.retire()

    def step(self) -> None:
        """One engine step: prefill newly admitted sequences, then one batched decode for all running ones."""
        t0 = time.perf_counter()
        admitted = self.scheduler.admit()
        for seq in admitted:
            self._accept(seq, self.runner.prefill(seq))
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids), model=self.name)
            self.metrics.ttft.observe(seq.first_token_at - seq.arrived, model=self.name)
        decoding = [s for s in self.scheduler.running if s.finish_reason is None and s.output_ids]
        if decoding:
            for seq, token in zip(decoding, self.runner.decode(decoding)):
                self._accept(seq, token)
        self.scheduler.retire()
        self.metrics.step(self.name, time.perf_counter() - t0, len(admitted) + len(decoding), self.queue_length, self.n_running)

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.finish_reason is not None:  # aborted during this step
            return
        seq.append(token, EOS_ID, self.max_len)
        self.metrics.generation_tokens.inc(1, model=self.name)
