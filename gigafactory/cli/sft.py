"""`gigafactory sft`: fine-tune a pre-trained checkpoint on chat conversations (loss on assistant tokens only)."""

from __future__ import annotations

import argparse
import os

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
            "Re-running the same command resumes. Several processes: torchrun --nproc-per-node N -m gigafactory.cli.main sft ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help="Pre-trained run directory or checkpoints/step-N directory.")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="Chat data: one {\"messages\": [{\"role\", \"content\"}, ...]} per line.")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="Conversations held out for the eval loss.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as TOML and exit.")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.posttrain.sft import SFTData, SFTTrainer, sft_config

    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    base, cfg = sft_config(args.checkpoint, args)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    return train_and_report(SFTTrainer(cfg, SFTData(base, args.data, args.val_fraction)), "eval loss (assistant tokens)")


def train_and_report(trainer, eval_name: str) -> int:
    """Run a post-training Trainer to its end; rank 0 prints the held-out metric's first and last value and the
    checkpoint (shared by `sft` and `dpo`)."""
    summary = trainer.train()
    trainer.close()
    if int(os.environ.get("RANK", "0")) == 0:
        if summary["eval"]:
            (first_step, first), (last_step, last) = summary["eval"][0], summary["eval"][-1]
            print(f"{eval_name}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0
