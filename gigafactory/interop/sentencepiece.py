"""Convert a SentencePiece BPE `tokenizer.model` (Grok-1's release ships one) into a `tokenizers` tokenizer.json.

Grok-1's model (/work/shared/reference/grok1-architecture.md §3): BPE, 131,072 pieces, byte_fallback, split_digits,
identity normalizer, add_dummy_prefix, remove_extra_whitespaces false; ids 0-3 [PAD] [BOS] [EOS] [UNK] (Gigafactory's
own special ids), then user-defined pieces (newline/space/tab runs, digits, <|separator|>, <|control1..20|>).

The .model file is a protobuf ModelProto, read here by hand (a few fields; no protobuf or sentencepiece package
needed at run time). The equivalent tokenizers pipeline is the one transformers' SpmConverter builds:
- pieces keep their ids; BPE merges come from the vocabulary (a piece is the merge of two pieces it splits into),
  ranked by the merged piece's score, which is SentencePiece's own merge order; byte_fallback maps unknown characters
  to the `<0xXX>` byte pieces;
- normalizer: the precompiled character map if any, whitespace collapsed if remove_extra_whitespaces; pre-tokenizer:
  Metaspace (spaces as "▁", the dummy "▁" prefix in front of the text), no splitting (SentencePiece's BPE encodes the
  whole text; split_by_whitespace and split_digits only constrain which pieces training made);
- control pieces become special added tokens, user-defined pieces plain added tokens (always one piece, as in
  SentencePiece); the decoder undoes "▁", byte fallback and the dummy prefix.
tests/interop/test_sentencepiece.py trains a SentencePiece model with Grok-1's options and requires equal ids and
text. One known difference: a text that *starts* with a space or a user-defined piece (newline, tab, digit) lacks
SentencePiece's leading "▁" token (tokenizers' Metaspace adds no prefix there); elsewhere the ids are the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) in id order
    model_type: int = 1
    byte_fallback: bool = False
    split_digits: bool = False
    split_by_whitespace: bool = True
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message; value is an int, bytes, or 4/8 raw bytes."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
            if len(value) != n:
                raise ValueError("truncated field")
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        result |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return result, i


def read_spm_model(path: Path) -> SpmModel:
    """The fields of a SentencePiece ModelProto that the conversion needs; UserError if it is not one."""
    try:
        m = SpmModel()
        for number, _, value in _fields(path.read_bytes()):
            if number == 1:  # SentencePiece {piece = 1, score = 2, type = 3}
                piece, score, kind = "", 0.0, NORMAL
                for n, _, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                m.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                names = {3: "model_type", 35: "byte_fallback", 25: "split_digits", 22: "split_by_whitespace", 24: "treat_whitespace_as_suffix"}
                for n, _, v in _fields(value):
                    if n in names:
                        setattr(m, names[n], v if n == 3 else bool(v))
            elif number == 3:  # NormalizerSpec
                names = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
                for n, _, v in _fields(value):
                    if n == 2:
                        m.precompiled_charsmap = bytes(v)
                    elif n in names:
                        setattr(m, names[n], bool(v))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as err:
        raise UserError(f"'{path}' is not a SentencePiece model ({err}); pass the release's tokenizer.model or a tokenizer.json") from None
    if not m.pieces:
        raise UserError(f"'{path}' is not a SentencePiece model (no pieces); pass the release's tokenizer.model or a tokenizer.json")
    return m


def convert_spm(path: str | Path):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece BPE model at `path`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    path = Path(path)
    m = read_spm_model(path)
    if m.model_type != BPE_MODEL:
        raise UserError(f"'{path}' is a SentencePiece model of type {m.model_type}; only BPE (type 2, Grok-1's) is converted")
    if m.treat_whitespace_as_suffix or not m.escape_whitespaces:
        raise UserError(f"'{path}' uses treat_whitespace_as_suffix or unescaped whitespace; such models are not converted")
    vocab = {piece: i for i, (piece, _, _) in enumerate(m.pieces)}
    unk = next((p for p, _, kind in m.pieces if kind == UNKNOWN), None)
    merges = []
    for piece, score, kind in m.pieces:
        if kind != NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(score, vocab[left], vocab[right], left, right) for left, right in splits]
    merges.sort(key=lambda t: (-t[0], t[1], t[2]))
    tok = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in merges], unk_token=unk,
                               byte_fallback=m.byte_fallback, fuse_unk=True))
    norm = [normalizers.Precompiled(m.precompiled_charsmap)] if m.precompiled_charsmap else []
    if m.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    # spaces become "▁" and a "▁" goes in front of the text (not after an added token); no further splitting, since
    # SentencePiece's BPE encodes the whole text (split_by_whitespace and split_digits only constrain training)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if m.add_dummy_prefix else "never", split=False)
    dec = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if m.byte_fallback else []) + [decoders.Fuse()]
    if m.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in m.pieces if kind == CONTROL])
    # user-defined pieces match the raw text as one piece; SentencePiece matches them after turning spaces into "▁",
    # so one holding a space (Grok-1's space runs) never matches there and is left to the model here too
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, kind in m.pieces if kind == USER_DEFINED and " " not in p])
    return tok
