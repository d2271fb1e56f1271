"""Read documents from the shipped corpus or the user's .txt / .jsonl files (optionally gzipped)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from gigafactory.errors import UserError

SHIPPED_CORPUS = Path(__file__).parent / "corpus" / "kjv.jsonl.gz"
CHUNK_CHARS = 1 << 16  # text handed to the tokenizer at a time (64 KiB: tokenizers holds ~100 bytes per character while it encodes)


def input_paths(inputs: list[str]) -> list[Path]:
    """The files to read; an empty list means the shipped corpus. Missing files are a clear error."""
    if not inputs:
        return [SHIPPED_CORPUS]
    paths = []
    for name in inputs:
        p = Path(name).expanduser()
        if p.is_dir():
            raise UserError(f"data file {name!r} is a directory; list its .txt or .jsonl files in data.inputs (comma-separated)")
        if not p.is_file():
            raise UserError(f"data file {name!r} not found; check data.inputs (a list of .txt or .jsonl files)")
        suffixes = [s for s in p.suffixes if s != ".gz"]
        if not suffixes or suffixes[-1] not in (".txt", ".jsonl"):
            raise UserError(f"data file {name!r} must end in .txt or .jsonl (optionally .gz)")
        paths.append(p)
    return paths


def read_documents(paths: list[Path]) -> Iterator[str]:
    """Yield whole documents: a .txt file is one document; each .jsonl line is {"text": ...}. Holds a document in
    memory; `read_chunks` streams instead."""
    parts: list[str] = []
    for text, ends_document in read_chunks(paths):
        parts.append(text)
        if ends_document:
            yield "".join(parts)
            parts = []


def read_chunks(paths: list[Path], max_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of about `max_chars` at most, so that memory is one piece whatever the size
    of a file (a 50 MB .txt was one 50 MB string, and 4.9 GB of tokenizer memory).

    A document is cut only where byte-level BPE pre-tokenization splits anyway (`_cut_points`), so the pieces encode
    to the same tokens as the whole document; `ends_document` marks where an [EOS] goes."""
    for p in paths:
        opener = gzip.open if p.suffix == ".gz" else open
        n_docs = 0
        try:
            with opener(p, "rt", encoding="utf-8") as f:
                if ".jsonl" in p.suffixes:
                    for line_no, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        text = _jsonl_text(p, line_no, line)
                        if text:
                            n_docs += 1
                            yield from _pieces(text, max_chars, True)
                else:
                    buf: list[str] = []
                    size, has_text = 0, False
                    for line in f:  # a .txt is one document, read a line at a time
                        if size >= max_chars and line[:1] and not line[:1].isspace():
                            yield "".join(buf), False  # ends with "\n", the next line starts a word: a split point
                            buf, size = [], 0
                        has_text = has_text or not line.isspace()
                        if len(line) > max_chars:  # one giant line: cut inside it too
                            pieces = [piece for piece, _ in _pieces(line, max_chars, False)]
                            for piece in pieces[:-1]:
                                buf.append(piece)
                                yield "".join(buf), False
                                buf, size = [], 0
                            line = pieces[-1]
                        buf.append(line)
                        size += len(line)
                    if has_text:
                        n_docs += 1
                        yield "".join(buf), True
        except UnicodeDecodeError as err:
            raise UserError(f"data file '{p}' is not valid UTF-8 ({err.reason} at byte {err.start}); convert it to UTF-8") from None
        except (OSError, EOFError) as err:
            raise UserError(f"data file '{p}' cannot be read ({err}); is it a valid (gzipped) text file?") from None
        if n_docs == 0:
            raise UserError(f"data file '{p}' contains no text; give a non-empty .txt or .jsonl file")


def _pieces(text: str, max_chars: int, ends_document: bool) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of about max_chars, cut at `_cut_points`; the last piece carries `ends_document`."""
    start = 0
    while len(text) - start > max_chars:
        cut = _cut_point(text, start + max_chars, min(len(text), start + 2 * max_chars))
        if cut is None:  # no split point in reach (one giant "word"): keep going until there is one
            cut = _cut_point(text, start + 2 * max_chars, len(text))
            if cut is None:
                break
        yield text[start:cut], False
        start = cut
    yield text[start:], ends_document


def _cut_point(text: str, lo: int, hi: int) -> int | None:
    """An index in [lo, hi) where GPT-2-style pre-tokenization splits: right after a newline or before a space, with
    a non-space character after it and a non-space (or the newline) before it."""
    for i in range(lo, hi):
        prev, nxt = text[i - 1], text[i + 1] if i + 1 < len(text) else ""
        if prev == "\n" and not text[i].isspace():
            return i
        if text[i] == " " and nxt and not nxt.isspace() and not prev.isspace():
            return i
    return None


def _jsonl_text(path: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{path}:{line_no} is not valid JSON; each .jsonl line must be an object like {{\"text\": \"...\"}}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UserError(f"{path}:{line_no} has no string field 'text'; each .jsonl line must be {{\"text\": \"...\"}}")
    return record["text"]
