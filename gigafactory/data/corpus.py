"""Read documents from the shipped corpus or the user's .txt / .jsonl files (optionally gzipped)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from gigafactory.errors import UserError

SHIPPED_CORPUS = Path(__file__).parent / "corpus" / "kjv.jsonl.gz"


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
    """Yield documents: a whole .txt file is one document; each .jsonl line is {"text": ...}."""
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
                            yield text
                else:
                    text = f.read()
                    if text.strip():
                        n_docs += 1
                        yield text
        except UnicodeDecodeError as err:
            raise UserError(f"data file '{p}' is not valid UTF-8 ({err.reason} at byte {err.start}); convert it to UTF-8") from None
        except (OSError, EOFError) as err:
            raise UserError(f"data file '{p}' cannot be read ({err}); is it a valid (gzipped) text file?") from None
        if n_docs == 0:
            raise UserError(f"data file '{p}' contains no text; give a non-empty .txt or .jsonl file")


def _jsonl_text(path: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{path}:{line_no} is not valid JSON; each .jsonl line must be an object like {{\"text\": \"...\"}}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UserError(f"{path}:{line_no} has no string field 'text'; each .jsonl line must be {{\"text\": \"...\"}}")
    return record["text"]
