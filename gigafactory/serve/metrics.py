"""Prometheus text exposition for /metrics: counters, gauges and a latency histogram, no client library."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] += amount

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] = value


class Histogram:
    kind = "histogram"
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels) -> None:
        with self._lock:
            s = self.series.setdefault(tuple(sorted(labels.items())), [0] * len(self.BUCKETS) + [0.0, 0])
            for i, bound in enumerate(self.BUCKETS):
                s[i] += value <= bound
            s[-2] += value
            s[-1] += 1

    def lines(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            labels = dict(key)
            for bound, n in zip(self.BUCKETS, s):
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': bound})} {n}")
            out.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(labels)} {s[-2]:g}")
            out.append(f"{self.name}_count{_labels(labels)} {s[-1]}")
        return out


class Metrics:
    """Every number /metrics shows. The engine, the access checks and the rollout policy write here."""

    WINDOW_S = 10.0  # tokens/s is averaged over this many seconds

    def __init__(self):
        p = "gigafactory_serve_"
        self.requests = Counter(p + "requests_total", "HTTP requests by endpoint and status code.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From arrival at the engine to the first token.")
        self.tokens_per_s = Gauge(p + "generation_tokens_per_second", "Tokens generated per second over the last 10 s.")
        self.queue_length = Gauge(p + "queue_length", "Requests waiting for a free KV-cache slot.")
        self.running = Gauge(p + "running_requests", "Requests holding a KV-cache slot.")
        self.rollout = Counter(p + "rollout_decisions_total", "Rollout policy decisions by region, state and outcome.")
        self.rollout_reloads = Counter(p + "rollout_reloads_total", "Rollout policy reloads by result (ok/error).")
        self.rate_limited = Counter(p + "rate_limited_total", "Requests refused with 429, by key name.")
        self._recent: dict[str, deque] = defaultdict(deque)

    def step(self, model: str, seconds: float, decoded: int, queue_length: int, running: int) -> None:
        now = time.monotonic()
        recent = self._recent[model]
        recent.append((now, decoded))
        while recent and recent[0][0] < now - self.WINDOW_S:
            recent.popleft()
        self.queue_length.set(queue_length, model=model)
        self.running.set(running, model=model)

    def render(self) -> str:
        now = time.monotonic()
        for model, recent in self._recent.items():
            tokens = sum(n for t, n in recent if t >= now - self.WINDOW_S)
            self.tokens_per_s.set(tokens / self.WINDOW_S, model=model)
        out = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.tokens_per_s,
                  self.queue_length, self.running, self.rollout, self.rollout_reloads, self.rate_limited):
            out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.lines()]
        return "\n".join(out) + "\n"
