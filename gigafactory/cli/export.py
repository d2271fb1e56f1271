"""`gigafactory export`: write a checkpoint as safetensors shards that vLLM, SGLang or transformers load."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export a checkpoint to the hf-grok1 (vLLM), sglang-grok (SGLang) or hf-mixtral (transformers) layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", required=True, help="A run directory, its checkpoints/ directory, or one checkpoints/step-N directory.")
    parser.add_argument("--format", required=True, choices=("hf-grok1", "sglang-grok", "hf-mixtral"),
                        help="Target layout (docs/interop.md lists every tensor name and shape).")
    parser.add_argument("--out", required=True, help="New or empty directory for the shards, index json, config.json and tokenizer.")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="Dtype of the exported weights.")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest shard file (e.g. 5GB, 500MB, 2GiB or bytes).")
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.interop import export_checkpoint
    from gigafactory.interop.deviation import deviation_warnings
    from gigafactory.interop.storage import GigafactorySource, parse_size

    files = export_checkpoint(args.checkpoint, args.format, args.out, args.dtype, parse_size(args.max_shard_size), progress=not args.no_progress)
    print(f"wrote {len(files)} shard(s), model.safetensors.index.json and config.json to {args.out}")
    for line in deviation_warnings(args.checkpoint, args.format, GigafactorySource(args.checkpoint).cfg):
        print(f"warning: {line}", file=sys.stderr)
    return 0
