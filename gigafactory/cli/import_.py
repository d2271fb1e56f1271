"""`gigafactory import`: turn the released Grok-1 checkpoint (or an exported safetensors directory) into a checkpoint."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from gigafactory.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="Import xAI's released Grok-1 checkpoint, or an hf-grok1/sglang-grok/hf-mixtral directory, as a Gigafactory checkpoint.",
        allow_abbrev=False,
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    grok1 = kinds.add_parser(
        "grok1", help="The released Grok-1 checkpoint (ckpt-0/: 770 pickled tensors, int8 + scales).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    grok1.add_argument("--from", dest="source", required=True, help="The ckpt-0/ directory (or the directory holding it).")
    grok1.add_argument("--out", required=True, help="New or empty directory; the checkpoint goes to OUT/checkpoints/step-00000000.")
    grok1.add_argument("--preset", default="grok-1", help="Model preset the checkpoint was made with.")
    grok1.add_argument("--model-config", default=None, help="TOML file whose [model] table overrides preset fields (for scaled-down checkpoints).")
    grok1.add_argument("--tokenizer", default=None, help="tokenizer.json, or the release's SentencePiece tokenizer.model (converted), to store with the checkpoint "
                       "(default: a tokenizer.json, else a tokenizer.model, found beside --from).")
    grok1.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="Dtype of the dequantised int8 weights.")
    grok1.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    grok1.set_defaults(func=run)
    hf = kinds.add_parser(
        "hf", help="A directory written by `gigafactory export` (any format), or a Mixtral / Grok-1 HF checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    hf.add_argument("--from", dest="source", required=True, help="Directory with config.json and *.safetensors.")
    hf.add_argument("--out", required=True, help="New or empty directory; the checkpoint goes to OUT/checkpoints/step-00000000.")
    hf.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    hf.set_defaults(func=run)


def _model_config(preset: str, override_file: str | None):
    from gigafactory.config.loader import model_config_from_table
    from gigafactory.models.config import ConfigError
    from gigafactory.models.presets import get_preset

    cfg = get_preset(preset)
    if override_file:
        p = Path(override_file).expanduser()
        if not p.is_file():
            raise UserError(f"model config file '{p}' not found; pass a TOML file with a [model] table")
        try:
            table = tomllib.loads(p.read_text()).get("model", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"model config file '{p}' is not valid TOML ({err}); fix the file") from None
        if not isinstance(table, dict):
            raise UserError(f"model config file '{p}': 'model' must be a [model] table")
        try:  # types checked as for `train --config` (a string d_model is one line, not a TypeError)
            cfg = model_config_from_table(table, cfg)
        except ConfigError as err:
            raise UserError(f"model config file '{p}': {err}; see `gigafactory train --help` for model keys") from None
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from gigafactory.interop import import_grok1, import_safetensors

    progress = not args.no_progress
    if args.kind == "grok1":
        ckpt = import_grok1(args.source, args.out, _model_config(args.preset, args.model_config), args.tokenizer, args.dtype, progress)
    else:
        ckpt = import_safetensors(args.source, args.out, progress)
    print(f"wrote {ckpt}")
    if not (ckpt / "tokenizer.json").is_file():
        print("note: no tokenizer.json was found; copy one into the checkpoint before `gigafactory generate`")
    return 0
