"""`gigafactory train`: train a Grok model (default: grok-tiny on the shipped corpus)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from gigafactory.config.loader import add_config_arguments, config_to_toml, load_config
from gigafactory.errors import UserError


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
    parser.add_argument("--nproc", type=int, default=1, help="Processes on this machine: > 1 starts the job under torchrun (one per GPU, or gloo on CPU).")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def launch_local(nproc: int, max_restarts: int) -> int:
    """Re-run this same command under torchrun's elastic agent with `nproc` workers on this machine; after a
    failure the agent restarts all workers (up to max_restarts times) and they resume from the newest checkpoint."""
    argv = sys.argv[sys.argv.index("train") + 1 :]
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N: the workers are the processes
        if arg == "--nproc":
            del argv[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "-m", "gigafactory.cli.main", "train", *argv]
    return subprocess.call(cmd)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc} must be >= 1")
    if "WORLD_SIZE" not in os.environ:  # check the layout before starting any process
        from gigafactory.parallel.build import check_supported
        from gigafactory.parallel.dims import resolve_dims

        check_supported(cfg, resolve_dims(cfg, args.nproc))
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_local(args.nproc, cfg.resilience.max_restarts)
    from gigafactory.train.trainer import Trainer  # imported late: --help and --print-config stay fast

    summary = Trainer(cfg).train()
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 speaks for the job
        return 0
    if summary["interrupted"]:
        print(f"interrupted at step {summary['end_step']}; checkpoint saved to {summary['checkpoint']} (run again to resume)")
    if summary["eval"]:
        (first_step, first), (last_step, last) = summary["eval"][0], summary["eval"][-1]
        print(f"eval loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    return 0
