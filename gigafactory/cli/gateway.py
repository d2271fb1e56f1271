"""`gigafactory gateway`: an OpenAI-compatible front door over serve / vLLM / SGLang replicas in several regions."""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gateway", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="Route OpenAI-compatible requests over model replicas by region, with a phased rollout and a canary.",
        description="Serve /v1/chat/completions and /v1/completions by forwarding to the replicas in a gateway TOML "
                    "(docs/gateway.md): health checks, least-loaded routing with affinity, regional rollout phases "
                    "advanced and rolled back by an SLO canary, API keys, rate limits and quotas. SIGHUP re-reads the file.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="Gateway TOML: replicas, regions and phases, SLO (docs/gateway.md).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 exposes it to the network).")
    p.add_argument("--port", type=int, default=8080, help="TCP port.")
    p.add_argument("--check", action="store_true", help="Validate the config, print the fleet and rollout, and exit.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="Log level.")
    p.set_defaults(func=run)


def describe(cfg) -> str:
    from gigafactory.gateway.canary import region_summary

    lines = [f"{len(cfg.replicas)} replica(s) in pools {', '.join(sorted(cfg.pools()))}"]
    for name, region in cfg.regions.items():
        n = sum(r.region == name for r in cfg.replicas)
        lines.append(f"  region {name}: {n} replica(s); phases {region_summary(region)}; fallback {region.fallback or '-'}"
                     + ("; KILLED" if region.killed else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from gigafactory.errors import UserError
    from gigafactory.gateway.app import Gateway
    from gigafactory.gateway.config import load_config

    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in 0..65535")
    cfg = load_config(args.config)
    gw = Gateway(cfg, path=args.config)
    print(describe(cfg), flush=True)
    if args.check:
        return 0
    import uvicorn

    from gigafactory.gateway.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"gateway on http://{args.host}:{args.port}/ ({'API keys required' if gw.keys else 'no API keys: open'})", flush=True)
    # http="h11": a bounded header parser (uvicorn buffers headers without limit under httptools), as in `serve`.
    uvicorn.run(create_app(gw), host=args.host, port=args.port, log_level=args.log_level, proxy_headers=False,
                timeout_graceful_shutdown=30, http="h11")
    return 0
