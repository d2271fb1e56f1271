"""The HTTP process's side of the engine process (serve/engine_core.py): the object the API server uses, with the
in-thread Engine's surface (submit -> a sequence-like handle, abort, queue_length, backlog, alive, stop, ...).

The HTTP process keeps only the tokenizer and the model's config; the weights live in the core. One reader thread
receives the core's step messages and hands a whole step's events to the event loop with ONE call_soon_threadsafe
(a handle submitted outside a running loop gets its events on the reader thread). If the core dies, every request
in flight ends with an error at once (no client hangs), `alive` is False (so /ready says not ready) until a new core
has loaded, and the client starts that new core itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tokenizers import Tokenizer

from gigafactory.data.tokenizer import plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import QueueFull
from gigafactory.serve.engine_core import CoreSpec, GrammarSpec, main, replay, to_core_time

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class EngineUnavailable(QueueFull):
    """The engine process is (re)starting: the server answers 503 + Retry-After, like a full queue."""


@dataclass(eq=False)
class RemoteSequence:
    """A request in the engine process, as the HTTP side sees it: filled in from the core's step messages."""

    id: int
    params: SamplingParams
    on_event: Callable[[str, str | None], None]
    logprobs: int | None
    loop: asyncio.AbstractEventLoop | None
    arrived: float
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


class EngineClient:
    delivers_on_loop = True  # on_event runs on the submitter's event loop: no thread hop needed there

    def __init__(self, spec: CoreSpec, tokenizer: Tokenizer, model_cfg, metrics, restart: bool = True):
        self.spec, self.tokenizer, self.name, self.metrics = spec, tokenizer, spec.name, metrics
        self.model_cfg = model_cfg
        self.text_encoder = plain_text_encoder(tokenizer)
        self.max_len = model_cfg.max_seq_len
        self.max_token_bytes = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1) or 1
        self.max_waiting = spec.max_waiting
        self.restart = restart
        self.restarts = 0  # cores started after the first (tests and logs read it)
        self._ids = itertools.count()
        self._live: dict[int, RemoteSequence] = {}
        self._lock = threading.Lock()  # one sender at a time on the pipe; submit's queue check and send together
        self._sent = self._seen = 0
        self._state = (0, 0, spec.n_slots, 0.0, 0)  # queue, running, free slots, kv usage, kv blocks
        self._ready = threading.Event()
        self._stopping = False
        self._proc = self._conn = self._reader = None

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # life cycle ---------------------------------------------------------------------------------------------------

    def start(self) -> "EngineClient":
        """Start the engine process and wait until it has loaded the model (a load failure is a UserError)."""
        if self._reader is not None:
            return self
        self._launch()
        self._reader = threading.Thread(target=self._read, name=f"engine-client-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _launch(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds threads, torch state and sockets
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=main, args=(child, self.spec), name=f"engine-core-{self.name}", daemon=True)
        proc.start()
        child.close()  # only the core holds its end: its death is end-of-file here
        try:
            ready = parent.recv() if parent.poll(START_TIMEOUT_S) else ("failed", "no answer while loading")
        except (EOFError, OSError):
            ready = ("failed", f"the engine process exited while loading (code {proc.join(5) or proc.exitcode})")
        if ready[0] != "ready":
            proc.kill()
            proc.join(5)
            parent.close()
            raise UserError(f"model '{self.name}': {ready[1]}")
        with self._lock:
            self._proc, self._conn, self._sent, self._seen = proc, parent, 0, 0
        log.info("engine process for '%s' ready (pid %d, %d torch threads)", self.name, proc.pid, self.spec.threads)
        self._ready.set()

    def stop(self) -> None:
        """Stop the engine process (after the HTTP side has drained its requests)."""
        self._stopping = True
        self._ready.clear()
        with self._lock:
            try:
                if self._conn is not None:
                    self._conn.send(("stop",))
            except OSError:
                pass
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        if self._reader is not None:
            self._reader.join(10)
        self._fail_all("the server is shutting down")

    @property
    def alive(self) -> bool:
        return self._ready.is_set() and not self._stopping and self._proc is not None and self._proc.is_alive()

    # the Engine surface -------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[str, str | None], None],
               stop: list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
               logprobs: int | None = None, deadline: float | None = None,
               stop_ids: frozenset[int] = frozenset()) -> RemoteSequence:
        """Engine.submit across the pipe. Raises QueueFull (EngineUnavailable while the core (re)starts)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        wire = params
        if params.constraint is not None:
            wire = replace(params, constraint=GrammarSpec(params.constraint.grammar))
        now = time.perf_counter()
        seq = RemoteSequence(next(self._ids), params, on_event, logprobs, loop, now)
        with self._lock:
            if not self.alive:
                raise EngineUnavailable(f"the engine process of model '{self.name}' is starting")
            if self.backlog >= self.max_waiting:
                raise QueueFull(f"{self.backlog} requests are already waiting for a slot of model '{self.name}'")
            self._live[seq.id] = seq
            try:
                self._conn.send(("submit", seq.id, list(prompt_ids), wire, stop or [], seed, ignore_eos, logprobs,
                                 stop_ids, to_core_time(now, now), to_core_time(deadline, now)))
            except OSError:  # the core died just now; the reader fails the others
                self._live.pop(seq.id, None)
                raise EngineUnavailable(f"the engine process of model '{self.name}' is restarting") from None
            self._sent += 1
        return seq

    def abort(self, seq: RemoteSequence) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = "abort"
        with self._lock:
            if self._live.pop(seq.id, None) is not None:
                try:
                    self._conn.send(("abort", seq.id))
                except OSError:
                    pass

    @property
    def queue_length(self) -> int:
        return self._state[0] + max(0, self._sent - self._seen)  # waiting in the core + still in the pipe

    @property
    def backlog(self) -> int:
        return max(0, self.queue_length - self._state[2])

    @property
    def n_running(self) -> int:
        return self._state[1]

    @property
    def in_flight(self) -> int:
        """Requests submitted here and not yet finished or aborted."""
        return len(self._live)

    # the reader thread --------------------------------------------------------------------------------------------

    def _read(self) -> None:
        while not self._stopping:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                self._core_died()
                continue
            if msg[0] == "step":
                self._on_step(*msg[1:])

    def _on_step(self, seen: int, state: tuple, changed: list, calls) -> None:
        self._seen, self._state = seen, state
        if calls is not None:
            replay(self.metrics, calls)
        batch = []
        for rid, pieces, ids, lps in changed:
            seq = self._live.get(rid)
            if seq is None:  # aborted here meanwhile
                continue
            if any(fin is not None for _, fin in pieces):
                self._live.pop(rid, None)
            batch.append((seq, pieces, ids, lps))
        self._dispatch(batch)

    def _dispatch(self, batch: list) -> None:
        by_loop: dict = {}
        for item in batch:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            if loop is None:
                _deliver(items)
            else:
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that loop is closed: nobody listens any more
                    pass

    def _core_died(self) -> None:
        self._ready.clear()
        self._conn.close()
        self._proc.join(5)
        code = self._proc.exitcode
        log.error("engine process for '%s' (pid %s) exited with code %s; failing %d request(s) in flight",
                  self.name, self._proc.pid, code, len(self._live))
        self.metrics.errors.inc(type="engine_process_exit")
        self._fail_all(f"the engine process exited (code {code}); the request was lost, retry it")
        self._state = (0, 0, self.spec.n_slots, 0.0, 0)
        if not self.restart:
            self._stopping = True
            return
        for attempt in itertools.count():
            if self._stopping:
                return
            log.warning("restarting the engine process for '%s' (restart %d)", self.name, self.restarts + 1)
            try:
                self._launch()
                self.restarts += 1
                return
            except UserError as err:
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.error("engine process for '%s' did not start: %s; retrying in %g s", self.name, err, wait)
                time.sleep(wait)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            doomed, self._live = list(self._live.values()), {}
        self._dispatch([(seq, [(message, "error")], [], []) for seq in doomed])


def _deliver(items: list) -> None:
    """Apply one step's events to their handles and call their on_event (on the handles' loop, or the reader)."""
    for seq, pieces, ids, lps in items:
        if seq.finish_reason == "abort":
            continue
        seq.output_ids += ids
        seq.token_logprobs += lps
        for text, finish in pieces:
            if finish is not None:
                seq.finish_reason = finish
            try:
                seq.on_event(text, finish)
            except Exception:  # a broken listener is its own request's problem
                log.exception("event callback of request %s failed", seq.id)
            if finish is not None:
                break
