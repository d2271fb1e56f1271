"""`gigafactory dpo`: preference-tune a checkpoint (pre-trained or SFT) on {prompt, chosen, rejected} JSONL."""

from __future__ import annotations

import argparse
import dataclasses

from gigafactory.config.loader import add_config_arguments, config_to_toml
from gigafactory.errors import UserError


def register(subparsers) -> None:
    from gigafactory.cli.sft import add_launch_arguments, add_lora_arguments
    from gigafactory.posttrain.options import DPOOptions

    parser = subparsers.add_parser(
        "dpo",
        allow_abbrev=False,
        help="Direct preference optimisation of a checkpoint on {prompt, chosen, rejected} JSONL.",
        description=(
            "DPO from a checkpoint (pre-trained or SFT), which is also the frozen reference: its log-probs of every "
            "pair are computed once and cached in the run directory. Pairs are packed with attention kept inside each "
            "sequence. Settings: the checkpoint's config, then DPO defaults (lr 1e-4, 50 steps), then --section.key "
            "flags. Re-running the same command resumes. Layouts: data parallel, FSDP, expert parallel; --nproc N runs it "
            "under torchrun as `train --nproc` does."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help="Starting (and reference) run or checkpoints/step-N directory.")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="One {\"prompt\": str | messages, \"chosen\": str, \"rejected\": str} per line.")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="Pairs held out for the eval loss.")
    for f in dataclasses.fields(DPOOptions):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"dpo_{f.name}", type=type(f.default), default=f.default,
                            choices=f.metadata.get("choices") or None, help=f.metadata["help"])
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as TOML and exit.")
    add_lora_arguments(parser)
    add_launch_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.cli.sft import launch_if_asked, lora_options
    from gigafactory.cli.train import train_and_report
    from gigafactory.posttrain.dpo import DPOTrainer
    from gigafactory.posttrain.options import DPO_DEFAULTS, DPOOptions
    from gigafactory.posttrain.sft import SFTData, sft_config

    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    opts = DPOOptions(**{f.name: getattr(args, f"dpo_{f.name}") for f in dataclasses.fields(DPOOptions)})
    opts.validate()
    lora = lora_options(args)
    base, cfg = sft_config(args.checkpoint, args, defaults=DPO_DEFAULTS, suffix="-dpo")
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return 0
    if (code := launch_if_asked("dpo", args, cfg)) is not None:
        return code
    return train_and_report(DPOTrainer(cfg, SFTData(base, args.data, args.val_fraction, lora), opts), "eval DPO loss (held-out pairs)")
