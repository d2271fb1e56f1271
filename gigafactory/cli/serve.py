"""`gigafactory serve`: Grok chat over an OpenAI-compatible HTTP API, with a web page at /."""

from __future__ import annotations

import argparse
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
    p.add_argument("--device", default="cpu", help="Device to run the model on (cpu or cuda).")
    p.add_argument("--slots", type=int, default=16, help="KV-cache slots per model: the most requests decoded together.")
    p.add_argument("--api-keys", metavar="FILE", help="TOML file of API keys (see docs/serve.md); GIGAFACTORY_API_KEYS also adds keys. No keys = open.")
    p.add_argument("--rate-limit", type=float, default=0, help="Requests per minute per API key (0 = unlimited); a key may override it.")
    p.add_argument("--rollout", metavar="FILE", help="Phased rollout policy TOML (see gigafactory/serve/rollout.example.toml); re-read on change or SIGHUP.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="Server log level.")
    p.set_defaults(func=run)


def build_state(args: argparse.Namespace):
    """Load the checkpoints and access files into a ServerState (engines not started yet)."""
    from gigafactory.errors import UserError
    from gigafactory.inference.generate import load_for_inference
    from gigafactory.serve.access import RateLimiter, load_keys
    from gigafactory.serve.api_server import ServerState
    from gigafactory.serve.engine import Engine
    from gigafactory.serve.metrics import Metrics
    from gigafactory.serve.rollout import RolloutPolicy

    if args.slots < 1:
        raise UserError(f"--slots {args.slots} must be >= 1")
    if args.rate_limit < 0:
        raise UserError(f"--rate-limit {args.rate_limit} must be >= 0 (0 = unlimited)")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in 0..65535")
    metrics = Metrics()
    engines = {}
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        loaded = load_for_inference(path, args.device)
        name = name or loaded.config.model.name
        if name in engines:
            raise UserError(f"--checkpoint {spec}: the name '{name}' is taken; write NAME=DIR to give each model its own")
        engines[name] = Engine(loaded.model, loaded.tokenizer, name, n_slots=args.slots, metrics=metrics)
    rollout = RolloutPolicy(args.rollout, metrics) if args.rollout else None
    if rollout is not None:
        missing = {r.model for r in [rollout.policy.default, *rollout.policy.regions.values()] if r.model} - set(engines)
        if missing:
            raise UserError(f"--rollout {args.rollout}: model(s) {', '.join(sorted(missing))} are not served; "
                            f"add --checkpoint NAME=DIR for each or fix the policy")
    keys = load_keys(args.api_keys)
    return ServerState(engines, next(iter(engines)), metrics, keys, RateLimiter(args.rate_limit), rollout)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gigafactory.serve.api_server import create_app

    state = build_state(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if state.rollout is not None and hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: state.rollout.reload())
    print(f"serving {', '.join(state.engines)} on http://{args.host}:{args.port}/ "
          f"({'API keys required' if state.keys else 'no API keys: open to anyone who can reach it'})", flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0
