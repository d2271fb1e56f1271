"""The gateway's /metrics (prometheus_client, one registry per gateway). Labels come from the config only (regions,
pools, replica names) plus "none" for a request refused before its region was known: clients add no series."""

from __future__ import annotations

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    CONTENT_TYPE = prom.CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = prom.CollectorRegistry()
        p = "gigafactory_gateway_"
        self.requests = prom.Counter(p + "requests_total", "Answered requests by region, pool and status.",
                                     ("region", "pool", "status"), registry=r)
        self.attempts = prom.Counter(p + "upstream_attempts_total", "Attempts on replicas by outcome "
                                     "(ok, client_error, server_error, unreachable, timeout, stream_broken, client_gone).",
                                     ("replica", "outcome"), registry=r)
        self.retries = prom.Counter(p + "retries_total", "Requests sent to another replica after a failed attempt "
                                    "that had streamed nothing.", registry=r)
        self.first_byte = prom.Histogram(p + "time_to_first_byte_seconds", "Gateway arrival to the replica's first "
                                         "byte (TTFT for streams).", ("pool",), buckets=LATENCY_BUCKETS, registry=r)
        self.replica_healthy = prom.Gauge(p + "replica_healthy", "1 while the replica is in the pool.", ("replica",), registry=r)
        self.outstanding = prom.Gauge(p + "replica_outstanding_requests", "Requests in flight per replica.", ("replica",), registry=r)
        self.phase = prom.Gauge(p + "rollout_phase", "Current phase per region (-1 before the first, -2 killed).",
                                ("region",), registry=r)
        self.tokens = prom.Counter(p + "tokens_total", "Tokens used by answered requests, by pool and kind (prompt, "
                                   "completion: as the replica reported them; estimated: a stream cut short or an "
                                   "answer without usage).", ("pool", "kind"), registry=r)
        self.refused = prom.Counter(p + "refused_total", "Requests refused by the gateway itself, by code.", ("code",), registry=r)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)
