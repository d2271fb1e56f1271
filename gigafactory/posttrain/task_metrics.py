"""Continuous scores of the KJV task, next to exact match: a tiny model's exact match stays 0 long after it has
started to learn, so these show each stage's progress on the held-out items.

- Teacher-forced answer scores: with the reference answer fed in, the mean log-likelihood per answer token (its
  [EOS] included) and the fraction of answer tokens that are the model's argmax (token accuracy).
- Preference accuracy: on held-out pairs (the answer against tasks.corrupt's near miss, as DPO trains on), how
  often the model gives the right answer a higher log-probability than the wrong one, and the mean margin. This is
  the policy's own preference (no reference model), so it compares across checkpoints. Every pair's margin is kept
  under a key of its text (item_key), so two checkpoints' results pair up item by item (posttrain/paired.py).
"""

from __future__ import annotations

import hashlib
import json

import torch

from gigafactory.data.chat import ChatTemplate
from gigafactory.data.preference import PackedPairLoader, pack_pairs, sequence_logps
from gigafactory.data.sft import PackedChatLoader, pack_conversations
from gigafactory.models.grok.head_loss import IGNORE_INDEX
from gigafactory.posttrain.tasks import preference_pairs


def item_key(*parts) -> str:
    """A short stable key of an item's (or pair's) text: the same item gets the same key in every eval JSON."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def answer_scores(model, template: ChatTemplate, items: list[dict]) -> dict:
    """Mean log-likelihood per answer token and teacher-forced token accuracy over every item's answer."""
    device = next(model.parameters()).device
    rows = pack_conversations([template.encode_conversation(item["messages"]) for item in items], model.cfg.max_seq_len - 1)
    loader = PackedChatLoader(rows, 1, 0, shuffle=False)
    logp_sum, hits, count = 0.0, 0, 0
    for _ in range(len(rows)):
        x, y, pos, doc = (t.to(device) for t in loader.next_batch()[:4])
        logits = model(x, pos, doc_ids_BS=doc).float()
        keep = y != IGNORE_INDEX
        logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        logp_sum += float(logp[keep].sum())
        hits += int((logits.argmax(-1) == y)[keep].sum())
        count += int(keep.sum())
    return {"answer_logp_per_token": logp_sum / max(count, 1), "answer_loss": -logp_sum / max(count, 1),
            "answer_token_accuracy": hits / max(count, 1), "answer_tokens": count}


@torch.no_grad()
def preference_scores(model, template: ChatTemplate, items: list[dict], seed: int = 0, rejected: str = "near") -> dict | None:
    """How often log p(answer) > log p(wrong answer) on `items`, the wrong one built as tasks.REJECTED[rejected]
    says (see score_pairs)."""
    pairs = [{"messages": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "kind": item["kind"]}
             for p, item in zip(preference_pairs(items, seed, rejected), items)]
    scores = score_pairs(model, template, pairs)
    return scores and {"rejected": rejected, **scores}


@torch.no_grad()
def score_pairs(model, template: ChatTemplate, every: list[dict]) -> dict | None:
    """Preference accuracy and mean margin log p(chosen) - log p(rejected) over pairs {messages, chosen, rejected,
    kind}, overall and per kind; pairs that do not fit the model's context are left out (counted as too_long).
    `per_pair`: [key, kind, margin] for every scored pair. None for a tokenizer without chat role tokens, or when
    no pair fits."""
    if not template.special:
        return None
    device = next(model.parameters()).device
    def size(pair: dict) -> int:  # both sequences of the pair in one row, as pack_pairs lays them out
        reply = sum(len(template.encoder.encode(pair[side]).ids) + 1 for side in ("chosen", "rejected"))
        return 2 * len(template.encode(pair["messages"])) + reply

    pairs = [p for p in every if size(p) <= model.cfg.max_seq_len]
    if not pairs:
        return None
    rows, docs = pack_pairs(pairs, template, model.cfg.max_seq_len - 1)
    loader = PackedPairLoader(rows, docs, 1, 0, shuffle=False)
    margins = torch.zeros(len(pairs))
    for _ in range(loader.n_windows):
        x, y, pos, doc, pair_docs = (t.to(device) for t in loader.next_batch()[:5])
        seq = sequence_logps(model(x, pos, doc_ids_BS=doc), y, doc, 2 * pair_docs.shape[1])[0]
        for chosen_doc, rejected_doc, k in pair_docs[0].tolist():
            if k >= 0:
                margins[k] = float(seq[chosen_doc] - seq[rejected_doc])
    kinds = sorted({p["kind"] for p in pairs})
    by_kind = {k: torch.tensor([p["kind"] == k for p in pairs]) for k in kinds}
    return {"preference_accuracy": float((margins > 0).float().mean()),
            "preference_margin": float(margins.mean()), "pairs": len(pairs), "too_long": len(every) - len(pairs),
            "by_kind": {k: {"preference_accuracy": float((margins[m] > 0).float().mean()), "pairs": int(m.sum())} for k, m in by_kind.items()},
            "per_pair": [[item_key(p["messages"], p["chosen"], p["rejected"]), p["kind"], float(m)] for p, m in zip(pairs, margins)]}
