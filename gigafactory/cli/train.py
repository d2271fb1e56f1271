"""`gigafactory train`: train a Grok model (default: grok-tiny on the shipped corpus)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from gigafactory.cli.local_launch import ERROR_FILE_FLAG
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
    parser.add_argument("--nproc", type=int, default=1, help="Processes on this machine: > 1 starts the job under torchrun (one per GPU, or gloo on CPU); with fault_tolerance.enabled, a torchft lighthouse and one torchrun of nproc / replica_groups processes per replica group.")
    parser.add_argument(ERROR_FILE_FLAG, dest="user_error_file", default="", help=argparse.SUPPRESS)  # set by --nproc for its workers
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def _worker_argv() -> list[str]:
    """This command's arguments without --nproc (the workers are the processes)."""
    argv = sys.argv[sys.argv.index("train") + 1 :]
    for i, arg in enumerate(argv):
        if arg == "--nproc":
            del argv[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    return argv


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc} must be >= 1")
    under_torchrun = "WORLD_SIZE" in os.environ
    if not under_torchrun:  # check the layout, run dir and data before starting any process
        from gigafactory.parallel.build import check_supported
        from gigafactory.parallel.dims import resolve_dims
        from gigafactory.train.evaluation import check_task_layout
        from gigafactory.train.preflight import preflight

        ft = cfg.fault_tolerance
        if ft.enabled and args.nproc % ft.replica_groups:
            raise UserError(f"--nproc={args.nproc} must be a multiple of fault_tolerance.replica_groups={ft.replica_groups} (one torchrun per group)")
        dims = resolve_dims(cfg, args.nproc // ft.replica_groups if ft.enabled else args.nproc)
        check_supported(cfg, dims)
        check_task_layout(cfg, dims)
        preflight(cfg)
    if (args.nproc > 1 or cfg.fault_tolerance.enabled) and not under_torchrun:  # fault tolerance: a lighthouse + torchrun per group
        from gigafactory.cli.local_launch import run_local

        return run_local(_worker_argv(), args.nproc, cfg.resilience.max_restarts, cfg.fault_tolerance)
    from gigafactory.train.trainer import Trainer  # imported late: --help and --print-config stay fast

    return train_and_report(Trainer(cfg), "eval loss")


def train_and_report(trainer, eval_name: str) -> int:
    """Run a Trainer (pre-training, SFT or DPO) to its end with eval.tasks' suites attached; rank 0 prints the
    held-out metric's first and last value, the suites' scores and the checkpoint. The exit code: 128 + signal
    after a stop outside torchrun, so a scheduler requeues the unfinished job (a torchrun worker exits 0 after a
    clean stop, or its agent would restart it)."""
    if trainer.cfg.eval.tasks:  # task suites live in posttrain/, above the trainer: it is handed them (train/evaluation.py)
        from gigafactory.posttrain.eval_suites import attach_task_suites

        attach_task_suites(trainer)
    summary = trainer.train()
    trainer.close()
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 speaks for the job
        from gigafactory.train.evaluation import summary_lines

        if summary["interrupted"]:
            print(f"{summary['interrupted']}: stopped after step {summary['end_step']}; checkpoint saved to {summary['checkpoint']} "
                  "(run the same command again to resume)")
        if summary["eval"]:
            (first_step, first), (last_step, last) = summary["eval"][0], summary["eval"][-1]
            print(f"{eval_name}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
        for line in summary_lines(summary.get("tasks", [])):  # eval.tasks' scores, first -> last
            print(line)
        print(f"checkpoint: {summary['checkpoint']}")
    if summary["interrupted"] and "WORLD_SIZE" not in os.environ:
        return 128 + int(getattr(signal, summary["interrupted"]))
    return 0
