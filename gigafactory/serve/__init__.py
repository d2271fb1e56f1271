"""`gigafactory serve`: Grok chat over an OpenAI-compatible HTTP API.

One job per file, read in this order:
  sequence.py       a request in flight: prompt, sampling, generated ids, incremental text and stop-string matching
  kv_cache.py       the slot-based KV cache: one cache row per running sequence, a free list of rows
  prefix_cache.py   which row already holds the start of a prompt (shared system prompts, earlier chat turns)
  model_runner.py   prefill a chunk of one prompt into its row, decode all running rows in one forward, sample
  scheduler.py      continuous batching: admit waiting requests into free rows, retire finished ones, every step
  engine.py         the loop thread tying the three together; submit/abort, bounded queue, deadlines, per-request failures
  chat_template.py  messages (system/user/assistant) -> prompt token ids (user text never becomes control tokens)
  rollout.py        the phased regional rollout policy (region, percent of users, allowlist, per-region model)
  access.py         API keys and the per-key rate limit
  metrics.py        /metrics through prometheus_client: counters, gauges, latency histograms, bounded labels
  protocol.py       OpenAI request schemas (honoured fields only), body checks, error bodies
  responses.py      submit an admitted request and answer it: one JSON body or a server-sent stream, logprobs
  api_server.py     the FastAPI app: routes, the admission gate, /health and /ready, errors
"""
