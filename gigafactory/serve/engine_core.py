"""The engine in its own process (vLLM's engine-core split): it loads the weights, runs the `Engine` loop, and talks
to the HTTP process over one pipe.

Why a process: in one process the engine thread and the asyncio HTTP loop share one GIL, so their Python parts run
one at a time (about 0.6 of a core used at 8 clients on 2 cores). Here each side has its own interpreter.

Messages (pickled, one per engine step in the core -> HTTP direction, never one per token):
  HTTP -> core: ("submit", rid, prompt_ids, params, stop, seed, ignore_eos, logprobs, stop_ids, arrived, deadline)
                ("abort", rid), ("stop",)
  core -> HTTP: ("ready", info) once loaded, or ("failed", message)
                ("step", seen, state, events, metric_calls): `seen` counts the submits received so far, `state` is
                (queue_length, running, free slots, kv usage, kv blocks), `events` is one tuple per request that
                changed, (rid, [(text, finish_reason), ...], new token ids, new logprob entries), and `metric_calls`
                the engine's metric updates of the step, replayed on the HTTP side's Prometheus registry.

Time: `arrived` and `deadline` are time.perf_counter() values of the HTTP process. On Linux perf_counter is
clock_gettime(CLOCK_MONOTONIC), one clock for every process of the machine, so they are used as they are
(`SHARED_CLOCK`); elsewhere they travel as offsets from "now" and are re-based on arrival.

The core ignores SIGINT (Ctrl-C reaches the whole process group; the HTTP process drains first and then stops it)
and exits when the HTTP process is gone: the pipe reports end-of-file, and the parent pid is checked too.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

SHARED_CLOCK = sys.platform.startswith("linux") and "CLOCK_MONOTONIC" in time.get_clock_info("perf_counter").implementation
IDLE_POLL_S = 0.5  # an idle core waits this long on the pipe between parent checks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSpec:
    """What the core needs to build its engine: the checkpoint and the Engine's settings."""

    checkpoint: str
    name: str
    device: str = "cpu"
    n_slots: int = 16
    max_waiting: int = 256
    prefix_cache: bool = True
    prefill_chunk: int = 512
    kv_blocks: int | None = None
    threads: int = 1  # torch intra-op threads in the core


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar constraint crossing the process boundary: its llguidance grammar text, compiled again in the core
    against the core's tokenizer (a compiled matcher cannot be pickled)."""

    grammar: str


def to_core_time(value: float | None, now: float) -> float | None:
    """An HTTP-process perf_counter value as sent to the core (unchanged on a shared clock, else an offset)."""
    return value if value is None or SHARED_CLOCK else value - now


def from_sender_time(value: float | None, now: float) -> float | None:
    return value if value is None or SHARED_CLOCK else now + value


class MetricsRelay:
    """Stands in for serve.metrics.Metrics inside the core: gathers the engine's metric calls of a step (counters
    summed, observations listed, the last gauge values) so the HTTP process replays them on its registry."""

    def __init__(self):
        self.counts: dict[tuple, float] = {}
        self.observed: dict[tuple, list[float]] = {}
        self.calls: list[tuple] = []  # step() / engine_state() calls, in order

    def __getattr__(self, family: str):
        if family.startswith("_"):
            raise AttributeError(family)
        return _RelayFamily(self, family)

    def step(self, *args) -> None:
        self.calls.append(("step", args))

    def engine_state(self, *args) -> None:
        self.calls.append(("engine_state", args))

    def take(self) -> tuple | None:
        """This step's calls, or None if there were none."""
        if not (self.counts or self.observed or self.calls):
            return None
        out = (self.counts, self.observed, self.calls)
        self.counts, self.observed, self.calls = {}, {}, []
        return out


class _RelayFamily:
    def __init__(self, relay: MetricsRelay, family: str):
        self.relay, self.family = relay, family

    def inc(self, amount: float = 1, **labels) -> None:
        key = (self.family, tuple(sorted(labels.items())))
        self.relay.counts[key] = self.relay.counts.get(key, 0) + amount

    def observe(self, value: float, **labels) -> None:
        self.relay.observed.setdefault((self.family, tuple(sorted(labels.items()))), []).append(value)


def replay(metrics, taken: tuple) -> None:
    """Apply a step's gathered metric calls to the HTTP process's Metrics."""
    counts, observed, calls = taken
    for (family, labels), amount in counts.items():
        getattr(metrics, family).inc(amount, **dict(labels))
    for (family, labels), values in observed.items():
        fam, kw = getattr(metrics, family), dict(labels)
        for v in values:
            fam.observe(v, **kw)
    for method, args in calls:
        getattr(metrics, method)(*args)


def main(conn: Connection, spec: CoreSpec) -> None:
    """The process entry (multiprocessing spawn target)."""
    from gigafactory.errors import UserError

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    try:
        engine = build_engine(spec)
    except Exception as err:  # a UserError (bad --kv-blocks, missing checkpoint) or a load failure: one line back
        conn.send(("failed", str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"))
        return
    gc.collect()
    gc.freeze()  # the loaded engine lives as long as the process: no full collector pass rescans it (~200 ms each)
    conn.send(("ready", {"pid": os.getpid(), "threads": spec.threads}))
    serve(conn, engine, parent=os.getppid())


def build_engine(spec: CoreSpec):
    import torch

    from gigafactory.inference.generate import load_for_inference
    from gigafactory.serve.engine import Engine

    torch.set_num_threads(spec.threads)
    loaded = load_for_inference(spec.checkpoint, spec.device)
    return Engine(loaded.model, loaded.tokenizer, spec.name, n_slots=spec.n_slots, metrics=MetricsRelay(),
                  max_waiting=spec.max_waiting, prefix_cache=spec.prefix_cache, prefill_chunk=spec.prefill_chunk,
                  kv_blocks=spec.kv_blocks)


class CoreLoop:
    """The core's single thread: read the pipe, step the engine, send one message per step."""

    def __init__(self, conn: Connection, engine, parent: int | None = None):
        self.conn, self.engine, self.parent = conn, engine, parent
        self.live: dict[int, list] = {}  # rid -> [sequence, token ids sent, logprob entries sent]
        self.events: dict[int, list] = {}  # rid -> this step's (text, finish) events
        self.seen = 0  # submits received (the HTTP side counts what is still in the pipe)
        self.running = True

    def run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        busy = False
        while self.running:
            if not self._receive(0 if busy else IDLE_POLL_S):
                return
            if not self.running:
                return
            busy = self.engine.run_once()
            self._send_step()

    def _receive(self, timeout: float) -> bool:
        """Handle every message waiting (waiting up to `timeout` for the first). False when the HTTP side is gone."""
        try:
            while self.conn.poll(timeout):
                timeout = 0
                self._handle(self.conn.recv())
                if not self.running:
                    break
        except (EOFError, OSError):
            return False
        return self.parent is None or os.getppid() == self.parent

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            self.seen += 1
            self._submit(*msg[1:])
        elif kind == "abort":
            entry = self.live.pop(msg[1], None)
            if entry is not None:
                self.engine.abort(entry[0])
        elif kind == "stop":
            self.running = False

    def _submit(self, rid, prompt_ids, params, stop, seed, ignore_eos, logprobs, stop_ids, arrived, deadline):
        from gigafactory.serve.engine import QueueFull
        from gigafactory.serve.structured import GrammarConstraint, ll_tokenizer

        now = time.perf_counter()
        events = self.events

        def on_event(text: str, finish: str | None) -> None:
            events.setdefault(rid, []).append((text, finish))

        try:
            if isinstance(params.constraint, GrammarSpec):
                params = replace(params, constraint=GrammarConstraint(ll_tokenizer(self.engine.tokenizer),
                                                                      params.constraint.grammar))
            seq = self.engine.submit(prompt_ids, params, on_event, stop, seed, ignore_eos, logprobs,
                                     from_sender_time(deadline, now), stop_ids)
        except QueueFull as err:
            events.setdefault(rid, []).append((f"the server is at capacity ({err})", "error"))
            return
        except Exception as err:  # this request's own settings broke (a grammar that does not compile here)
            log.exception("request %s could not be submitted", rid)
            events.setdefault(rid, []).append((f"generation failed: {type(err).__name__}", "error"))
            return
        seq.arrived = from_sender_time(arrived, now)
        self.live[rid] = [seq, 0, 0]

    def _send_step(self) -> None:
        changed = []
        for rid, entry in list(self.live.items()):
            seq, sent_ids, sent_lps = entry
            pieces = self.events.pop(rid, None)
            if pieces is None and len(seq.output_ids) == sent_ids and len(seq.token_logprobs) == sent_lps:
                if seq.finish_reason is not None:  # aborted or ended without a word: nothing left to send
                    del self.live[rid]
                continue
            entry[1], entry[2] = len(seq.output_ids), len(seq.token_logprobs)
            changed.append((rid, pieces or [], seq.output_ids[sent_ids:], seq.token_logprobs[sent_lps:]))
            if seq.finish_reason is not None:
                del self.live[rid]
        for rid, pieces in self.events.items():  # refused at submit: never live
            changed.append((rid, pieces, [], []))
        self.events.clear()
        calls = self.engine.metrics.take()
        if not changed and calls is None:
            return
        e = self.engine
        state = (e.queue_length, e.n_running, e.kv.n_free, e.kv.blocks_in_use / e.kv.n_blocks, e.kv.blocks_in_use)
        self.conn.send(("step", self.seen, state, changed, calls))


def serve(conn: Connection, engine, parent: int | None = None) -> None:
    """Run the core loop until the HTTP side says stop or goes away."""
    CoreLoop(conn, engine, parent).run()
    log.info("engine core for '%s' stopping", engine.name)
