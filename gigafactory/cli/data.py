"""`gigafactory data`: train a tokenizer and tokenize text into shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gigafactory.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="Train a BPE tokenizer and tokenize text into binary shards.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    tok = sub.add_parser("tokenizer", help="Train a byte-level BPE tokenizer (HF tokenizers) and write tokenizer.json.")
    tok.add_argument("inputs", nargs="*", help="Text files (.txt, .jsonl, optionally .gz); none = the shipped KJV corpus.")
    tok.add_argument("--vocab-size", type=int, default=4096, help="Vocabulary size including the 4 special tokens.")
    tok.add_argument("--out", default="tokenizer.json", help="Where to write tokenizer.json.")
    tok.set_defaults(func=run_tokenizer)

    prep = sub.add_parser("prepare", help="Tokenize text into train.bin / val.bin shards (uint16 or uint32) plus meta.json.")
    prep.add_argument("inputs", nargs="*", help="Text files (.txt, .jsonl, optionally .gz); none = the shipped KJV corpus.")
    prep.add_argument("--tokenizer", default="", help="tokenizer.json to use; empty = train one of --vocab-size.")
    prep.add_argument("--vocab-size", type=int, default=4096, help="Vocabulary size (also picks uint16 vs uint32 shards).")
    prep.add_argument("--val-fraction", type=float, default=0.02, help="Fraction of the tokens held out for evaluation (whole blocks of up to 4096 tokens, chosen with --seed).")
    prep.add_argument("--seed", type=int, default=1234, help="Seed of the train/val split.")
    prep.add_argument("--cache-dir", default="~/.cache/gigafactory", help="Directory under which the prepared dataset is written.")
    prep.set_defaults(func=run_prepare)


def run_tokenizer(args: argparse.Namespace) -> int:
    from gigafactory.data.corpus import input_paths, read_chunks
    from gigafactory.data.tokenizer import train_tokenizer

    texts = (text for text, _ in read_chunks(input_paths(args.inputs)))  # ~1 MB at a time: memory stays bounded
    tokenizer = train_tokenizer(texts, args.vocab_size, Path(args.out))
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens)")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from gigafactory.data.shards import prepare_dataset

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction={args.val_fraction} must be between 0 and 1")
    out = prepare_dataset(args.inputs, args.vocab_size, args.cache_dir, args.val_fraction, args.seed, args.tokenizer)
    meta = json.loads((out / "meta.json").read_text())
    print(f"prepared {out}: {meta['tokens']['train']} train / {meta['tokens']['val']} val tokens")
    print(f"train on it with: gigafactory train --data.tokenizer {out / 'tokenizer.json'} --data.inputs {','.join(args.inputs) or '(shipped corpus)'}")
    return 0
