"""Tokenize documents into binary token shards (numpy memmap), with a cache keyed by inputs and tokenizer.

Layout of a prepared directory: tokenizer.json, train.bin, val.bin (uint16 or uint32 by vocab size; each document
followed by [EOS]) and meta.json (dtype, token counts, provenance). Every file is written to a temp name and renamed,
so an interrupted prepare never leaves a half-written shard behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from gigafactory.data.corpus import input_paths, read_documents
from gigafactory.data.tokenizer import EOS_ID, MAX_VOCAB_SIZE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from gigafactory.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_dataset(inputs: list[str], vocab_size: int, cache_dir: str, val_fraction: float, seed: int, tokenizer_path: str = "") -> Path:
    """Return a directory holding tokenizer.json, train.bin, val.bin and meta.json, building it if needed."""
    paths = input_paths(inputs)
    key = hashlib.sha256()
    for p in paths:
        stat = p.stat()
        key.update(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    key.update(f"{vocab_size}|{val_fraction}|{seed}|{','.join(SPECIAL_TOKENS)}".encode())
    if tokenizer_path:
        key.update(load_tokenizer(tokenizer_path).to_str().encode())
    if not str(cache_dir).strip():
        raise UserError("the cache directory is empty; pass a directory with --cache-dir (data.cache_dir)")
    out = Path(cache_dir).expanduser() / f"dataset-{key.hexdigest()[:16]}"
    if (out / "meta.json").is_file():
        return out
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too large; use at most {MAX_VOCAB_SIZE} (Grok-1 has 131072)")
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the dataset under cache dir '{cache_dir}' ({err.strerror or err}); "
                        "pass a writable directory with --cache-dir (data.cache_dir)") from None
    try:
        return _build(out, paths, vocab_size, val_fraction, seed, tokenizer_path)
    except BaseException as err:
        if not existed:  # a failed prepare leaves no half-built dataset directory behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write the dataset to '{out}' ({err.strerror or err}); free space or pass another --cache-dir") from None
        raise


def _build(out: Path, paths: list[Path], vocab_size: int, val_fraction: float, seed: int, tokenizer_path: str) -> Path:
    documents = list(read_documents(paths))
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        (out / "tokenizer.json").write_text(tokenizer.to_str())
    else:
        tokenizer = train_tokenizer(documents, vocab_size, out / "tokenizer.json")
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size={vocab_size}; raise model.vocab_size")

    order = np.random.default_rng(seed).permutation(len(documents))
    n_val = max(1, int(round(len(documents) * val_fraction)))
    if len(documents) - n_val < 1:
        raise UserError(f"only {len(documents)} document(s): too few to hold out a validation split; add more text")
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    dtype = token_dtype(vocab_size)
    counts = {}
    for split, doc_ids in splits.items():
        encoded = tokenizer.encode_batch([documents[i] for i in doc_ids])
        tokens = np.fromiter((t for e in encoded for t in (*e.ids, EOS_ID)), dtype=dtype)
        counts[split] = int(tokens.size)
        tmp = out / f"{split}.bin.{os.getpid()}.tmp"  # per-process: concurrent preparers never share a temp file
        tokens.tofile(tmp)
        tmp.replace(out / f"{split}.bin")
    meta = {
        "dtype": dtype.name, "vocab_size": vocab_size, "tokens": counts, "documents": {k: len(v) for k, v in splits.items()},
        "inputs": [str(p) for p in paths], "seed": seed, "val_fraction": val_fraction,
    }
    tmp_meta = out / f"meta.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    tmp_meta.replace(out / "meta.json")  # written last: its presence marks a complete dataset
    return out


def open_split(dataset_dir: Path, split: str) -> np.memmap:
    meta = json.loads((dataset_dir / "meta.json").read_text())
    return np.memmap(dataset_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
