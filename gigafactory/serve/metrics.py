"""Everything /metrics shows, through prometheus_client (one registry per server, so tests can run several).

Label values are bounded by construction: endpoints are the known routes or "other", models are the served names,
error types are a fixed vocabulary of codes, key names come from the operator's keys file, and rollout regions
are the ones the policy names (anything else is "other"). A client can never add a series.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

import prometheus_client as prom

prom.disable_created_metrics()  # the *_created series double the exposition and nobody reads them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Family:
    """A labelled prometheus_client metric called with keyword labels: `inc(model="x")`, `get(model="x")`."""

    def __init__(self, kind, name: str, help: str, labels: tuple[str, ...], registry, **kw):
        self.labelnames = tuple(sorted(labels))
        self.metric = kind(name, help, self.labelnames, registry=registry, **kw)
        self._children: dict[tuple, object] = {}  # the engine updates a few series per token: skip labels() lookups

    def _child(self, labels: dict):
        if not self.labelnames:
            return self.metric
        key = tuple(str(labels[k]) for k in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metric.labels(*key)
        return child

    def inc(self, amount: float = 1, **labels) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, **labels) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, **labels) -> None:
        self._child(labels).observe(value)

    def get(self, **labels) -> float:
        """A counter's or gauge's current value (0 if the series does not exist yet)."""
        key = tuple(str(labels[k]) for k in self.labelnames)
        child = self.metric._metrics.get(key) if self.labelnames else self.metric
        return 0.0 if child is None else child._value.get()


class Metrics:
    """Every number /metrics shows. The engine, the server, the access checks and the rollout policy write here."""

    WINDOW_S = 10.0  # tokens/s is averaged over this many seconds
    CONTENT_TYPE = prom.CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = reg = prom.CollectorRegistry()
        p = "gigafactory_serve_"
        C, G, H = prom.Counter, prom.Gauge, prom.Histogram
        self.requests = _Family(C, p + "requests", "HTTP responses by endpoint and status code.", ("endpoint", "status"), reg)
        self.errors = _Family(C, p + "errors", "Failed requests by error type (the error code, or the engine's).", ("type",), reg)
        self.prompt_tokens = _Family(C, p + "prompt_tokens", "Prompt tokens prefilled.", ("model",), reg)
        self.prefix_cached_tokens = _Family(C, p + "prefix_cached_tokens", "Prompt tokens taken from the prefix cache "
                                            "instead of being prefilled.", ("model",), reg)
        self.generation_tokens = _Family(C, p + "generation_tokens", "Tokens generated.", ("model",), reg)
        self.latency = _Family(H, p + "request_latency_seconds", "End-to-end time of a generation request, arrival to "
                               "last byte.", ("model",), reg, buckets=LATENCY_BUCKETS)
        self.ttft = _Family(H, p + "time_to_first_token_seconds", "From arrival at the engine to the first token.",
                            ("model",), reg, buckets=LATENCY_BUCKETS)
        self.inter_token = _Family(H, p + "inter_token_latency_seconds", "Time between two tokens of one request.",
                                   ("model",), reg, buckets=INTER_TOKEN_BUCKETS)
        self.tokens_per_s = _Family(G, p + "generation_tokens_per_second", "Tokens generated per second over the last 10 s.",
                                    ("model",), reg)
        self.queue_length = _Family(G, p + "queue_length", "Requests waiting for a free KV-cache slot.", ("model",), reg)
        self.running = _Family(G, p + "running_requests", "Requests holding a KV-cache slot.", ("model",), reg)
        self.kv_usage = _Family(G, p + "kv_cache_usage_ratio", "Share of the KV-cache blocks held by requests "
                                "(blocks that only keep a finished prompt for the prefix cache are free).", ("model",), reg)
        self.kv_blocks = _Family(G, p + "kv_cache_blocks_in_use", "KV-cache blocks (16 tokens each) held by running "
                                 "requests.", ("model",), reg)
        self.rejected = _Family(C, p + "rejected", "Requests refused with 503 because the queue was full.", ("model",), reg)
        self.rollout = _Family(C, p + "rollout_decisions", "Rollout policy decisions by region, state and outcome.",
                               ("region", "rule", "state", "decision"), reg)
        self.rollout_reloads = _Family(C, p + "rollout_reloads", "Rollout policy reloads by result (ok/error).", ("result",), reg)
        self.rate_limited = _Family(C, p + "rate_limited", "Requests refused with 429, by key name.", ("key",), reg)
        self._recent: dict[str, deque] = defaultdict(deque)

    def step(self, model: str, seconds: float, decoded: int, queue_length: int, running: int, kv_usage: float = 0.0,
             kv_blocks: int = 0) -> None:
        now = time.monotonic()
        recent = self._recent[model]
        recent.append((now, decoded))
        while recent and recent[0][0] < now - self.WINDOW_S:
            recent.popleft()
        self.engine_state(model, queue_length, running, kv_usage, kv_blocks)

    def engine_state(self, model: str, queue_length: int, running: int, kv_usage: float = 0.0, kv_blocks: int = 0) -> None:
        self.queue_length.set(queue_length, model=model)
        self.running.set(running, model=model)
        self.kv_usage.set(kv_usage, model=model)
        self.kv_blocks.set(kv_blocks, model=model)

    def render(self) -> bytes:
        now = time.monotonic()
        for model, recent in list(self._recent.items()):
            tokens = sum(n for t, n in list(recent) if t >= now - self.WINDOW_S)
            self.tokens_per_s.set(tokens / self.WINDOW_S, model=model)
        return prom.generate_latest(self.registry)
