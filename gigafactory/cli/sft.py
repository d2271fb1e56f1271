"""`gigafactory sft`: fine-tune a pre-trained checkpoint on chat conversations (loss on assistant tokens only)."""

from __future__ import annotations

import argparse
import os
import sys

from gigafactory.cli.local_launch import ERROR_FILE_FLAG
from gigafactory.config.loader import add_config_arguments, config_to_toml
from gigafactory.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        allow_abbrev=False,
        help="Supervised fine-tuning of a checkpoint on {\"messages\": [...]} chat JSONL.",
        description=(
            "Fine-tune a pre-trained checkpoint on OpenAI-style chat JSONL with serve's chat template: conversations "
            "packed into data.seq_len sequences with attention kept inside each one, loss on assistant tokens only. "
            "Settings: the checkpoint's config, then SFT defaults (lr 3e-4, 100 steps), then --section.key flags. "
            "Re-running the same command resumes. --nproc N runs it under torchrun as `train --nproc` does. --lora.rank R "
            "trains low-rank adapters on a frozen base instead (attention, dense-FFN and MoE expert weights; every layout); "
            "checkpoints hold the merged weights."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help="Pre-trained run directory or checkpoints/step-N directory.")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="Chat data: one {\"messages\": [{\"role\", \"content\"}, ...]} per line.")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="Conversations held out for the eval loss.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as TOML and exit.")
    add_lora_arguments(parser)
    add_launch_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def add_lora_arguments(parser) -> None:
    """--lora.rank/alpha/targets (shared by `sft` and `dpo`); dests without a dot, so the config loader skips them."""
    import dataclasses

    from gigafactory.posttrain.options import LoRAOptions

    for f in dataclasses.fields(LoRAOptions):
        parser.add_argument(f"--lora.{f.name}", dest=f"lora_{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])


def lora_options(args: argparse.Namespace):
    import dataclasses

    from gigafactory.posttrain.options import LoRAOptions

    opts = LoRAOptions(**{f.name: getattr(args, f"lora_{f.name}") for f in dataclasses.fields(LoRAOptions)})
    opts.validate()
    return opts


def add_launch_arguments(parser) -> None:
    """--nproc and the launcher's private error-file flag (shared by `sft` and `dpo`)."""
    parser.add_argument("--nproc", type=int, default=1, help="Processes on this machine: > 1 runs the job under torchrun "
                        "(one per GPU, or gloo on CPU), through the same launcher as `train --nproc`.")
    parser.add_argument(ERROR_FILE_FLAG, dest="user_error_file", default="", help=argparse.SUPPRESS)  # set by --nproc for its workers


def launch_if_asked(command: str, args: argparse.Namespace, cfg) -> int | None:
    """Under --nproc N > 1 (and not already a torchrun worker): check the layout, then re-run this command's
    arguments (without --nproc) under torchrun with cli/local_launch's LocalJob (signals forwarded, user errors
    printed once and never retried) and return its exit code; otherwise None (run here)."""
    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc} must be >= 1")
    if args.nproc == 1 or "WORLD_SIZE" in os.environ:
        return None
    from gigafactory.cli.local_launch import LocalJob, torchrun_cmd
    from gigafactory.parallel.build import check_supported
    from gigafactory.parallel.dims import resolve_dims

    if cfg.fault_tolerance.enabled:
        raise UserError(f"{command} --nproc does not run replica groups (fault_tolerance.enabled); set it to false")
    from gigafactory.train.evaluation import check_task_layout

    dims = resolve_dims(cfg, args.nproc)
    check_supported(cfg, dims)
    check_task_layout(cfg, dims)
    cmd = torchrun_cmd([], args.nproc, cfg.resilience.max_restarts)
    cmd[-1] = command  # torchrun_cmd ends with `gigafactory.cli.main train`; the same launch, another subcommand
    job = LocalJob([cmd + worker_argv(command)])
    try:
        return job.wait()
    finally:
        job.cleanup()


def worker_argv(command: str) -> list[str]:
    """This process's arguments after the subcommand, without --nproc (the workers are the processes)."""
    argv = sys.argv[sys.argv.index(command) + 1:]
    for i, arg in enumerate(argv):
        if arg == "--nproc":
            return argv[:i] + argv[i + 2:]
        if arg.startswith("--nproc="):
            return argv[:i] + argv[i + 1:]
    return argv


def run(args: argparse.Namespace) -> int:
    from gigafactory.posttrain.sft import SFTData, SFTTrainer, sft_config

    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    lora = lora_options(args)
    base, cfg = sft_config(args.checkpoint, args)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    if (code := launch_if_asked("sft", args, cfg)) is not None:
        return code
    from gigafactory.cli.train import train_and_report

    return train_and_report(SFTTrainer(cfg, SFTData(base, args.data, args.val_fraction, lora)), "eval loss (assistant tokens)")
