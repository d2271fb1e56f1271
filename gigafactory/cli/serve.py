"""`gigafactory serve`: Grok chat over an OpenAI-compatible HTTP API, with a web page at /."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="Serve checkpoints over an OpenAI-compatible API (continuous batching, web chat, rollout policy).",
        description="Serve one or more checkpoints over /v1/completions and /v1/chat/completions, with a chat page at /.",
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                   help="A run directory or checkpoint to serve; repeat to serve several. NAME defaults to the model's preset name.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 exposes it to the network).")
    p.add_argument("--port", type=int, default=8000, help="TCP port.")
    p.add_argument("--device", default="cpu", help="Device to run the model on (cpu, cuda or cuda:N).")
    p.add_argument("--slots", type=int, default=16, help="KV-cache slots per model: the most requests decoded together.")
    p.add_argument("--api-keys", metavar="FILE", help="TOML file of API keys (see docs/serve.md); GIGAFACTORY_API_KEYS also adds keys. No keys = open.")
    p.add_argument("--rate-limit", type=float, default=0, help="Requests per minute per API key (0 = unlimited); a key may override it.")
    p.add_argument("--rollout", metavar="FILE", help="Phased rollout policy TOML (see gigafactory/serve/rollout.example.toml); re-read on change or SIGHUP.")
    p.add_argument("--prefill-chunk", type=int, default=512, help="Prompt tokens prefilled per engine step: a long prompt is spread over steps so running streams keep decoding.")
    p.add_argument("--kv-blocks", type=int, default=0, help="KV-cache blocks of 16 tokens per model, shared by all requests (0 = a full context per slot); fewer blocks than slots x context lets short requests share memory.")
    p.add_argument("--no-prefix-cache", action="store_true", help="Prefill every prompt in full (no reuse of cached prompt starts).")
    p.add_argument("--trusted-proxies", default="127.0.0.1,::1", metavar="IP[/BITS],...",
                   help="Clients whose region/user headers are believed (your reverse proxy); '' = nobody.")
    p.add_argument("--max-queue", type=int, default=256, help="Requests that may wait for a slot per model; more get 503 + Retry-After.")
    p.add_argument("--request-timeout", type=float, default=600, help="Seconds a request may take from arrival to its last token (0 = no limit).")
    p.add_argument("--shutdown-timeout", type=float, default=30, help="Seconds SIGTERM waits for open requests and connections before closing them.")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="Run each model's engine in its own process (the HTTP process keeps only the tokenizer); "
                        "--no-engine-process runs it as a thread of the HTTP process.")
    p.add_argument("--engine-threads", type=int, default=0,
                   help="torch threads of each engine process (0 = every core but one, which is left to HTTP).")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="Server log level.")
    p.set_defaults(func=run)


def build_state(args: argparse.Namespace):
    """Load the checkpoints and access files into a ServerState (engines not started yet)."""
    from gigafactory.errors import UserError
    from gigafactory.inference.generate import check_device, load_for_inference
    from gigafactory.serve.access import RateLimiter, load_keys
    from gigafactory.serve.api_server import ServerState
    from gigafactory.serve.engine import Engine, check_kv_blocks
    from gigafactory.inference.generate import load_checkpoint_files
    from gigafactory.serve.engine_client import EngineClient
    from gigafactory.serve.engine_core import CoreSpec
    from gigafactory.serve.metrics import Metrics
    from gigafactory.serve.rollout import RolloutPolicy

    if args.slots < 1:
        raise UserError(f"--slots {args.slots} must be >= 1")
    if not 0 <= args.rate_limit < float("inf"):
        raise UserError(f"--rate-limit {args.rate_limit} must be >= 0 (0 = unlimited)")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in 0..65535")
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk} must be >= 1")
    if not 0 <= args.kv_blocks <= 1 << 24:
        raise UserError(f"--kv-blocks {args.kv_blocks} must be between 0 (a full context per slot) and {1 << 24}")
    if args.engine_threads < 0:
        raise UserError(f"--engine-threads {args.engine_threads} must be >= 0 (0 = every core but one)")
    if args.max_queue < 1:
        raise UserError(f"--max-queue {args.max_queue} must be >= 1")
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-timeout", args.shutdown_timeout)):
        if not 0 <= value < float("inf"):
            raise UserError(f"{flag} {value} must be a number of seconds >= 0")
    proxies = parse_proxies(args.trusted_proxies)
    check_device(args.device)
    keys = load_keys(args.api_keys)
    if args.rate_limit and not keys:
        raise UserError(f"--rate-limit {args.rate_limit:g} limits requests per API key, and no key is configured; "
                        "add --api-keys FILE (or GIGAFACTORY_API_KEYS), or drop --rate-limit")
    metrics = Metrics()
    engines = {}
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if args.engine_process:  # the weights load in the engine process; here only what HTTP needs
            tokenizer, config, ckpt = load_checkpoint_files(path)
        else:
            loaded = load_for_inference(path, args.device)
            tokenizer, config, ckpt = loaded.tokenizer, loaded.config, loaded.checkpoint
        name = name or config.model.name
        if name in engines:
            raise UserError(f"--checkpoint {spec}: the name '{name}' is taken; write NAME=DIR to give each model its own")
        check_kv_blocks(args.kv_blocks or None, config.model.max_seq_len)
        if args.engine_process:
            core = CoreSpec(str(ckpt), name, args.device, args.slots, args.max_queue, not args.no_prefix_cache,
                            args.prefill_chunk, args.kv_blocks or None, args.engine_threads or default_engine_threads())
            engines[name] = EngineClient(core, tokenizer, config.model, metrics)
        else:
            engines[name] = Engine(loaded.model, tokenizer, name, n_slots=args.slots, metrics=metrics,
                                   max_waiting=args.max_queue, prefix_cache=not args.no_prefix_cache,
                                   prefill_chunk=args.prefill_chunk, kv_blocks=args.kv_blocks or None)
    rollout = RolloutPolicy(args.rollout, metrics) if args.rollout else None
    if rollout is not None:
        missing = {r.model for r in [rollout.policy.default, *rollout.policy.regions.values()] if r.model} - set(engines)
        if missing:
            raise UserError(f"--rollout {args.rollout}: model(s) {', '.join(sorted(missing))} are not served; "
                            f"add --checkpoint NAME=DIR for each or fix the policy")
    return ServerState(engines, next(iter(engines)), metrics, keys, RateLimiter(args.rate_limit), rollout, proxies,
                       args.request_timeout or None)


def default_engine_threads() -> int:
    """Every core this process may use but one, left to the HTTP process (one when there is only one)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def parse_proxies(text: str) -> tuple:
    """--trusted-proxies as networks; a bad address is a one-line error."""
    import ipaddress

    from gigafactory.errors import UserError

    nets = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UserError(f"--trusted-proxies: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(nets)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gigafactory.serve.api_server import create_app

    state = build_state(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for engine in state.engines.values():  # engine processes load here, so a failure is one line, not a
            engine.start()  # traceback from the server's startup (starting again in the lifespan is a no-op)
    except BaseException:
        for engine in state.engines.values():
            engine.stop()
        raise
    if state.rollout is not None and hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: state.rollout.reload())
    print(f"serving {', '.join(state.engines)} on http://{args.host}:{args.port}/ "
          f"({'API keys required' if state.keys else 'no API keys: open to anyone who can reach it'})", flush=True)
    # What start-up made (modules, weights in thread mode) lives as long as the server: keep it out of the collector's
    # full passes, which otherwise stall every stream for ~200 ms now and then (vLLM freezes it too).
    gc.collect()
    gc.freeze()
    # timeout_graceful_shutdown: SIGTERM drains streams, but idle or stalled connections cannot hold it forever.
    # proxy_headers=False: uvicorn would replace the peer address with X-Forwarded-For from a local proxy, and the
    # trust check (--trusted-proxies) must see the proxy itself. http="h11": its parser bounds a request's headers
    # (16 KB); with httptools, which uvicorn picks when installed, uvicorn buffers header bytes without limit.
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level, http="h11",
                timeout_graceful_shutdown=args.shutdown_timeout, proxy_headers=False)
    return 0
