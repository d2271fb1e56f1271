"""Tokenize documents into binary token shards (numpy memmap), with a cache keyed by inputs and tokenizer.

Layout of a prepared directory: tokenizer.json, train.bin, val.bin (uint16 or uint32 by vocab size; each document
followed by [EOS]) and meta.json (dtype, token counts, provenance). Every file is written to a temp name and renamed,
so an interrupted prepare never leaves a half-written shard behind.

Memory is bounded whatever the input size: text is read in ~1 MB pieces (corpus.read_chunks, cut where the tokens do
not change), the tokenizer trains on that stream, and encoding writes each batch of pieces (BATCH_CHARS of text) to
disk before reading the next. The validation split is a fraction of *tokens*, not of documents (one long .txt is
fine; two files no longer put half the data in val): the token stream is cut into blocks of at most BLOCK_TOKENS and a
seeded random choice of round(fraction x blocks) of them, at least one, becomes val.bin.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from gigafactory.data.corpus import input_paths, read_chunks
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
    key.update(f"{vocab_size}|{val_fraction}|{seed}|{','.join(SPECIAL_TOKENS)}|token-split".encode())
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


BATCH_CHARS = 1 << 20  # text encoded per encode_batch call (~250k tokens; tokenizers' transient memory is ~100 bytes a character)
BLOCK_TOKENS = 4096  # granularity of the train/val split


def _build(out: Path, paths: list[Path], vocab_size: int, val_fraction: float, seed: int, tokenizer_path: str) -> Path:
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        (out / "tokenizer.json").write_text(tokenizer.to_str())
    else:
        tokenizer = train_tokenizer((text for text, _ in read_chunks(paths)), vocab_size, out / "tokenizer.json")
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size={vocab_size}; raise model.vocab_size")
    dtype = token_dtype(vocab_size)
    stream = out / f"all.bin.{os.getpid()}.tmp"
    try:
        n_tokens, n_docs = _encode_to(stream, tokenizer, paths, dtype)
        counts, n_blocks = _split(stream, out, n_tokens, dtype, val_fraction, seed)
    finally:
        stream.unlink(missing_ok=True)
    meta = {
        "dtype": dtype.name, "vocab_size": vocab_size, "tokens": counts, "documents": n_docs, "split": "tokens",
        "block_tokens": BLOCK_TOKENS, "val_blocks": n_blocks, "inputs": [str(p) for p in paths], "seed": seed, "val_fraction": val_fraction,
    }
    tmp_meta = out / f"meta.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    tmp_meta.replace(out / "meta.json")  # written last: its presence marks a complete dataset
    return out


def _encode_to(path: Path, tokenizer, paths: list[Path], dtype: np.dtype) -> tuple[int, int]:
    """Append the tokens of every document (each followed by [EOS]) to `path`; returns (tokens, documents)."""
    n_tokens = n_docs = 0
    batch: list[tuple[str, bool]] = []
    size = 0
    with open(path, "wb") as f:
        def flush():
            nonlocal n_tokens, n_docs
            encoded = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
            for enc, (_, ends_document) in zip(encoded, batch):
                ids = np.asarray(enc.ids + [EOS_ID] if ends_document else enc.ids, dtype=dtype)
                ids.tofile(f)
                n_tokens += ids.size
                n_docs += ends_document
            batch.clear()

        for piece in read_chunks(paths):
            batch.append(piece)
            size += len(piece[0])
            if size >= BATCH_CHARS:
                flush()
                size = 0
        if batch:
            flush()
    return n_tokens, n_docs


def _split(stream: Path, out: Path, n_tokens: int, dtype: np.dtype, val_fraction: float, seed: int) -> tuple[dict, int]:
    """Copy the token stream into train.bin and val.bin block by block (a seeded choice of blocks is val)."""
    if n_tokens < 2:
        raise UserError(f"the data holds only {n_tokens} token(s): too little to hold out a validation split; add more text")
    block = min(BLOCK_TOKENS, max(1, n_tokens // 64))  # small inputs still get a few dozen blocks to choose from
    n_blocks = -(-n_tokens // block)
    n_val = min(n_blocks - 1, max(1, round(n_blocks * val_fraction)))
    val = set(np.random.default_rng(seed).choice(n_blocks, n_val, replace=False).tolist())
    tokens = np.memmap(stream, dtype=dtype, mode="r", shape=(n_tokens,))
    counts = {"train": 0, "val": 0}
    tmps = {split: out / f"{split}.bin.{os.getpid()}.tmp" for split in counts}  # per-process: concurrent preparers never share one
    try:
        with open(tmps["train"], "wb") as train, open(tmps["val"], "wb") as held_out:
            for b in range(n_blocks):
                part = np.asarray(tokens[b * block : (b + 1) * block])
                (held_out if b in val else train).write(part.tobytes())
                counts["val" if b in val else "train"] += part.size
        for split, tmp in tmps.items():
            tmp.replace(out / f"{split}.bin")
    finally:
        del tokens
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return counts, n_val


def open_split(dataset_dir: Path, split: str) -> np.memmap:
    meta = json.loads((dataset_dir / "meta.json").read_text())
    return np.memmap(dataset_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
