"""Byte-level BPE tokenizer (HF `tokenizers`) with Grok-1's special-token ids 0 [PAD], 1 [BOS], 2 [EOS], 3 [UNK], then chat roles."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gigafactory.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0-6; roles for chat
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_VOCAB_SIZE = 2**20  # 8x Grok-1's 131,072; the BPE trainer's memory grows with it (1e9 aborts in Rust asking for 70 GB)


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train on the documents and write tokenizer.json atomically (tmp file + rename)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab size {vocab_size} is too small for a byte-level BPE; use at least {256 + len(SPECIAL_TOKENS)}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too large; use at most {MAX_VOCAB_SIZE} (Grok-1 has 131072)")
    check_output_file(out_path)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tmp))
        tmp.replace(out_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write tokenizer to '{out_path}' ({err.strerror or err}); pass a writable file path") from None
    return tokenizer


def check_output_file(out_path: Path) -> None:
    """Refuse an output path that cannot become a file, before training spends minutes (and leaves a temp file)."""
    if not str(out_path) or str(out_path) == "." or out_path.is_dir():
        raise UserError(f"tokenizer output '{out_path}' is a directory or empty; pass a file path such as {out_path / 'tokenizer.json' if out_path.is_dir() else 'tokenizer.json'}")
    parent = next((a for a in out_path.parents if a.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write tokenizer to '{out_path}' ('{parent}' is not a writable directory); pass a writable file path")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json; a missing or corrupt file is a one-line error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"tokenizer file '{p}' not found; train one with `gigafactory data tokenizer` or leave data.tokenizer empty")
    try:
        tokenizer = Tokenizer.from_file(str(p))
    except Exception as err:  # tokenizers raises plain Exception subclasses for parse errors
        raise UserError(f"tokenizer file '{p}' is corrupt ({str(err).splitlines()[0][:120]}); retrain it with `gigafactory data tokenizer`") from None
    if tokenizer.token_to_id("[EOS]") != EOS_ID:
        raise UserError(f"tokenizer file '{p}' lacks [EOS] at id {EOS_ID}; train it with `gigafactory data tokenizer`")
    return tokenizer


def plain_text_encoder(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of the tokenizer for user text: "[EOS]" or "<|user|>" typed by a person are encoded as plain characters,
    never as the control tokens (which would end a document or forge a chat turn). Control tokens are added by id."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain
