"""`gigafactory serve`: Grok chat over an OpenAI-compatible HTTP API.

One job per file, read in this order:
  sequence.py       a request in flight: prompt, sampling, generated ids, incremental text with stop strings
  kv_cache.py       the slot-based KV cache: one cache row per running sequence, a free list of rows
  model_runner.py   prefill one sequence into its row, decode all running rows in one batched forward
  scheduler.py      continuous batching: admit waiting requests into free rows, retire finished ones, every step
  engine.py         the loop thread tying the three together; thread-safe submit/abort for the server
  chat_template.py  messages (system/user/assistant) -> prompt text
  rollout.py        the phased regional rollout policy (region, percent of users, allowlist, per-region model)
  access.py         API keys and the per-key rate limit
  metrics.py        Prometheus text for /metrics
  protocol.py       OpenAI request schemas and error bodies
  api_server.py     the FastAPI app: routes, streaming, errors
"""
