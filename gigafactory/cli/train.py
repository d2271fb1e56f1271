"""`gigafactory train`: train a Grok model (default: grok-tiny on the shipped corpus)."""

from __future__ import annotations

import argparse

from gigafactory.config.loader import add_config_arguments, config_to_toml, load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        allow_abbrev=False,
        help="Train a model (default: grok-tiny on the shipped KJV corpus).",
        description=(
            "Train a Grok-family model. Settings come from defaults, then --preset, then --config FILE.toml, then "
            "--section.key VALUE flags. Re-running with the same logging.run_dir resumes from its newest checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as TOML and exit.")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    from gigafactory.train.trainer import Trainer  # imported late: --help and --print-config stay fast

    summary = Trainer(cfg).train()
    if summary["interrupted"]:
        print(f"interrupted at step {summary['end_step']}; checkpoint saved to {summary['checkpoint']} (run again to resume)")
    if summary["eval"]:
        (first_step, first), (last_step, last) = summary["eval"][0], summary["eval"][-1]
        print(f"eval loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    return 0
