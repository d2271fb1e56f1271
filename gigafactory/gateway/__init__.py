"""`gigafactory gateway`: one OpenAI-compatible front door over model replicas in several regions.

One job per file, read in this order:
  config.py   the TOML as typed dataclasses: replicas (url, region, pool), regions and their phases, SLO, health, routing
  pool.py     replica health (active checks and passive ejection) and requests in flight
  router.py   least outstanding requests, session affinity and prefix-aware preference (rendezvous hashing)
  canary.py   the rollout as fleet policy: which pool serves a user; advance / rollback / kill, logged as JSON lines
  proxy.py    forward and relay (SSE passthrough), retry while nothing was streamed, a clean error event after
  usage.py    the tokens a request used, from the answer's usage or a stream's final usage chunk (asked for, stripped)
  quota.py    token quotas per key per window, and each gateway pod's share of every limit
  metrics.py  /metrics
  app.py      the FastAPI app: keys, rate limits, request and token quotas, region, rollout, admin routes
"""
