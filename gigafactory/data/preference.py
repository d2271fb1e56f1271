"""Preference data for DPO: `{"prompt", "chosen", "rejected"}` JSONL -> rows of packed (chosen, rejected) pairs.

The prompt is a string (one user turn) or a list of chat messages; chosen and rejected are assistant replies. Each
is encoded as serve prompts and SFT trains: template.encode(prompt) + reply + [EOS]. A pair's two sequences are
packed into the same row as two documents (document-masked attention keeps them apart), so a row's forward pass
gives both log-probabilities of every pair it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gigafactory.data.chat import ROLES, ChatTemplate
from gigafactory.data.sft import PackedRows, jsonl_lines
from gigafactory.data.tokenizer import EOS_ID, PAD_ID
from gigafactory.errors import UserError
from gigafactory.models.grok.head_loss import IGNORE_INDEX


def read_preference_jsonl(path: str | Path) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"preference data '{p}' {'is a directory' if p.is_dir() else 'not found'}; pass a .jsonl file of "
                        f"{{\"prompt\", \"chosen\", \"rejected\"}} lines")
    pairs = []
    for n, line in jsonl_lines(p):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{p}:{n}: not a JSON object with 'prompt', 'chosen' and 'rejected'") from None
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not (isinstance(chosen, str) and isinstance(rejected, str) and isinstance(messages, list) and
                all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)):
            raise UserError(f"{p}:{n}: 'chosen' and 'rejected' must be strings and 'prompt' a string or a list of messages")
        pairs.append({"messages": messages, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise UserError(f"preference data '{p}' has no pairs")
    return pairs


def pack_pairs(pairs: list[dict], template: ChatTemplate, seq_len: int) -> tuple[PackedRows, np.ndarray]:
    """(rows, pair_docs [N_rows, max pairs per row, 3] of (chosen doc, rejected doc, pair index), -1 padded).
    A pair's index is its "index" field, else its position in `pairs`; a pair whose two sequences do not fit one row is an error."""
    if not template.special:
        raise UserError("preference training needs a tokenizer with the chat role tokens (see `gigafactory sft`)")
    width = seq_len + 1
    rows: list[list[tuple[int, list[int], list[int], int]]] = []
    room: list[int] = []
    for k, pair in enumerate(pairs):
        prompt = template.encode(pair["messages"])
        seqs = [(prompt, template.encoder.encode(pair[side]).ids + [EOS_ID]) for side in ("chosen", "rejected")]
        size = sum(len(p) + len(c) for p, c in seqs)
        if size > width:
            raise UserError(f"preference pair {k + 1} needs {size} tokens for prompt+chosen and prompt+rejected, more "
                            f"than a row of data.seq_len+1={width}; raise data.seq_len or shorten it")
        i = next((r for r, free in enumerate(room) if free >= size), None)
        if i is None:
            rows.append([]), room.append(width)
            i = len(rows) - 1
        index = pair.get("index", k)
        rows[i] += [(index, *seqs[0], 0), (index, *seqs[1], 1)]
        room[i] -= size
    n = len(rows)
    out = PackedRows(np.full((n, width), PAD_ID, np.int64), np.zeros((n, width), bool), np.zeros((n, width), np.int64),
                     np.zeros((n, width), np.int64))
    pair_docs = np.full((n, max(len(r) for r in rows) // 2, 3), -1, np.int64)
    for r, row in enumerate(rows):
        at = 0
        for doc, (k, prompt, completion, side) in enumerate(row):
            ids = prompt + completion
            out.tokens[r, at:at + len(ids)] = ids
            out.trained[r, at + len(prompt):at + len(ids)] = True
            out.doc_ids[r, at:at + len(ids)], out.positions[r, at:at + len(ids)] = doc, np.arange(len(ids))
            pair_docs[r, doc // 2, side], pair_docs[r, doc // 2, 2] = doc, k
            at += len(ids)
        out.doc_ids[r, at:], out.positions[r, at:] = len(row), np.arange(width - at)
    return out, pair_docs


class PackedPairLoader:
    """Batches of (inputs, targets, positions, doc_ids, pair_docs, n) for this data-parallel rank; state as
    PackedChatLoader's (rows consumed by all ranks together)."""

    def __init__(self, rows: PackedRows, pair_docs: np.ndarray, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True):
        from gigafactory.data.sft import PackedChatLoader

        self.rows = PackedChatLoader(rows, batch_size, seed, dp_rank, dp_size, shuffle)
        self.pair_docs = pair_docs
        self.n_windows = self.rows.n_windows

    @property
    def consumed(self) -> int:
        return self.rows.consumed

    @consumed.setter
    def consumed(self, value: int) -> None:
        self.rows.consumed = value

    def next_batch(self):
        """(inputs, targets, positions, doc_ids, pair_docs, n): n is the pair count of the micro-batch on all ranks."""
        r = self.rows
        idx, n = r.next_rows((self.pair_docs[..., 2] >= 0).sum(1))
        return (*(torch.from_numpy(a[idx]) for a in (r.inputs, r.targets, r.positions, r.doc_ids, self.pair_docs)), n)

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


def sequence_logps(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, doc_ids_BS: torch.Tensor, n_docs: int) -> torch.Tensor:
    """[B, n_docs]: the summed log-probability of each document's trained tokens (targets != IGNORE_INDEX)."""
    valid = targets_BS != IGNORE_INDEX
    logp = torch.log_softmax(logits_BSV.float(), -1).gather(-1, targets_BS.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    out = torch.zeros(targets_BS.shape[0], n_docs + 1, dtype=logp.dtype, device=logp.device)
    return out.scatter_add(1, doc_ids_BS.clamp(max=n_docs), logp)[:, :n_docs]
