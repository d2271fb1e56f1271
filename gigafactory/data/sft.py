"""Chat data for supervised fine-tuning: OpenAI-style `{"messages": [...]}` JSONL -> packed, loss-masked sequences.

Conversations are packed whole into rows of seq_len + 1 tokens (inputs and shifted targets), first fit in a seeded
order, the rest of a row padded. Each token carries its conversation's id and its position within the conversation
(from 0), so document-masked attention (models/grok/model.py) makes every token see exactly what it would if its
conversation were alone. Targets are IGNORE_INDEX except on tokens an assistant wrote. The loader's state is the
count of rows consumed, as PackedSequenceLoader's, so a run resumes at the same place with any number of ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gigafactory.data.chat import ROLES, ChatTemplate
from gigafactory.data.loader import SeededOrder
from gigafactory.data.tokenizer import PAD_ID
from gigafactory.errors import UserError
from gigafactory.models.grok.head_loss import IGNORE_INDEX


def jsonl_lines(p: Path):
    """(line number, text) of a UTF-8 file; bytes that are not UTF-8 are one error naming the line."""
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is dropped
            except UnicodeDecodeError as err:
                raise UserError(f"{p}:{n}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file, each line {"messages": [{"role", "content"}, ...]} with an assistant turn."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"chat data '{p}' {'is a directory' if p.is_dir() else 'not found'}; pass a .jsonl file of "
                        f"{{\"messages\": [...]}} lines")
    conversations = []
    for n, line in jsonl_lines(p):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{p}:{n}: not a JSON object with a 'messages' list") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"{p}:{n}: each message must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{p}:{n}: the conversation has no assistant turn to learn from")
        conversations.append(messages)
    if not conversations:
        raise UserError(f"chat data '{p}' has no conversations")
    return conversations


@dataclass
class PackedRows:
    """[N, seq_len + 1] arrays: token ids, trained (assistant-written) flags, conversation ids, positions."""

    tokens: np.ndarray
    trained: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def pack_conversations(encoded: list[tuple[list[int], list[bool]]], seq_len: int) -> PackedRows:
    """First-fit packing of whole conversations into rows of seq_len + 1 tokens; a longer one is cut to a row.
    Conversations left without a trained token by the cut are dropped. Padding is a document of its own."""
    width = seq_len + 1
    rows: list[list[tuple[list[int], list[bool]]]] = []
    room: list[int] = []
    for ids, trained in encoded:
        ids, trained = ids[:width], trained[:width]
        if not any(trained[1:]):  # nothing left to learn (the first token is never a target)
            continue
        i = next((r for r, free in enumerate(room) if free >= len(ids)), None)
        if i is None:
            rows.append([]), room.append(width)
            i = len(rows) - 1
        rows[i].append((ids, trained))
        room[i] -= len(ids)
    if not rows:
        raise UserError(f"no conversation has an assistant token within data.seq_len={seq_len}; raise data.seq_len")
    out = PackedRows(np.full((len(rows), width), PAD_ID, np.int64), np.zeros((len(rows), width), bool),
                     np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64))
    for r, row in enumerate(rows):
        at = 0
        for doc, (ids, trained) in enumerate(row):
            n = len(ids)
            out.tokens[r, at:at + n], out.trained[r, at:at + n] = ids, trained
            out.doc_ids[r, at:at + n], out.positions[r, at:at + n] = doc, np.arange(n)
            at += n
        out.doc_ids[r, at:], out.positions[r, at:] = len(row), np.arange(width - at)
    return out


def build_rows(conversations: list[list[dict]], template: ChatTemplate, seq_len: int, seed: int) -> PackedRows:
    """Encode with the serving chat template, then pack in a seeded order (the same on every rank)."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    return pack_conversations([template.encode_conversation(conversations[i]) for i in order], seq_len)


def split_conversations(conversations: list[list[dict]], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded val_fraction of the conversations (at least one when there are two or more)."""
    n_val = min(len(conversations) - 1, max(1 if val_fraction > 0 else 0, round(len(conversations) * val_fraction)))
    held = set(np.random.default_rng([seed, 1]).permutation(len(conversations))[:n_val].tolist())
    return [c for i, c in enumerate(conversations) if i not in held], [c for i, c in enumerate(conversations) if i in held]


class PackedChatLoader(SeededOrder):
    """Batches of (inputs, targets, positions, doc_ids), each [batch_size, seq_len], for this data-parallel rank,
    and the micro-batch's trained-token count over all ranks."""

    RESUME_HINT = "resume with the same chat data and data.seq_len/data.seed, or start a new run directory"

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        self.batch_size, self.seed, self.dp_rank, self.dp_size, self.shuffle = batch_size, seed, dp_rank, dp_size, shuffle
        self.seq_len = rows.tokens.shape[1] - 1
        self.n_windows = len(rows)
        same_doc = rows.doc_ids[:, 1:] == rows.doc_ids[:, :-1]
        self.inputs, self.positions, self.doc_ids = rows.tokens[:, :-1], rows.positions[:, :-1], rows.doc_ids[:, :-1]
        self.targets = np.where(rows.trained[:, 1:] & same_doc, rows.tokens[:, 1:], IGNORE_INDEX)
        self.weights = (self.targets != IGNORE_INDEX).sum(1)  # what a row adds to the loss's denominator
        self._start()

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, positions, doc_ids, n): n is the trained-token count of this micro-batch on all ranks
        together, so each rank can weight its loss to make the step's loss the global token mean in any layout."""
        idx, n = self.next_rows(self.weights)
        return (*(torch.from_numpy(a[idx]) for a in (self.inputs, self.targets, self.positions, self.doc_ids)), n)

    def next_rows(self, weights: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """This rank's rows of the next micro-batch, and the sum of `weights` over every rank's rows of it."""
        every = [self._index(self.consumed + i) for i in range(self.batch_size * self.dp_size)]
        self.consumed += self.batch_size * self.dp_size
        mine = np.asarray(every[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size])
        return mine, torch.tensor(float(weights[every].sum()))
