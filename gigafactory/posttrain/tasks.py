"""A task measurable here: instructions built from the shipped KJV corpus, split by sentence, scored by exact match.

The corpus keeps chapters, not verse numbers (data/corpus/README.md), so the unit is the sentence: two kinds of
item ask the model what pre-training could have taught it and SFT teaches it to answer in a fixed format:
  reference:  Which book and chapter says "<sentence>"?        ->  <Book> <chapter>
  continue:   Quote what follows in <Book> <chapter>: "<s>"     ->  <the next sentence>
Each sentence (by its text) is assigned to train or test by a seeded hash; an item belongs to the split of every sentence it
shows, and items touching both splits are dropped, so no test answer or question appears in the training set.

Preference pairs (DPO's training pairs, and the held-out pairs `eval` scores) put the answer against a wrong one,
built one of two ways (REJECTED):
  near:  a near miss: the neighbouring chapter, or the next sentence with two adjacent words swapped;
  far:   a real answer of another item of the same split and kind from a different book, of the same shape (word
         count, length): another book's chapter, or a sentence of another book. Chosen and rejected come from the
         same distribution of answers and both are well formed, so only the question's content separates them (no
         prior, fluency or length shortcut), and drawing within one split keeps test sentences out of training pairs.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from gigafactory.data.corpus import SHIPPED_CORPUS
from gigafactory.errors import UserError

SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
MIN_CHARS, MAX_CHARS = 20, 120  # short sentences: a tiny model's context and a fair exact match


def chapters() -> list[tuple[str, list[str]]]:
    """(reference "Book N", its sentences) for every chapter of the shipped corpus, in order."""
    out = []
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            head, _, body = json.loads(line)["text"].partition("\n\n")
            out.append((head.strip(), [s.strip() for s in SENTENCE_END.split(body) if s.strip()]))
    return out


def _item(kind: str, question: str, answer: str) -> dict:
    return {"kind": kind, "answer": answer,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build_task(test_fraction: float = 0.1, seed: int = 0, max_train: int = 4000, max_test: int = 200) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}: items with chat `messages` (the answer as the assistant turn) and `answer`."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    book = chapters()
    where = Counter(s for _, sentences in book for s in set(sentences))
    for ref, sentences in book:
        # by the text, so a sentence the Bible repeats lands in one split wherever it occurs
        is_test = [zlib.crc32(f"{seed}|{s}".encode()) < test_fraction * 2**32 for s in sentences]
        ok = [MIN_CHARS <= len(s) <= MAX_CHARS for s in sentences]
        for i, s in enumerate(sentences):
            if not ok[i]:
                continue
            if where[s] == 1:  # a sentence found in several chapters has no single right reference
                splits["test" if is_test[i] else "train"].append(_item("reference", f'Which book and chapter says "{s}"?', ref))
            if i + 1 < len(sentences) and ok[i + 1] and is_test[i] == is_test[i + 1]:
                splits["test" if is_test[i] else "train"].append(
                    _item("continue", f'Quote what follows in {ref}: "{s}"', sentences[i + 1]))
    pick = np.random.default_rng([seed, 1])
    return {name: [items[j] for j in sorted(pick.permutation(len(items))[:cap])]
            for (name, items), cap in zip(splits.items(), (max_train, max_test))}


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after trimming and collapsing whitespace (case and punctuation count: a quote must be exact)."""
    return " ".join(prediction.split()) == " ".join(answer.split())


REJECTED = ("near", "far")


def corrupt(item: dict, rng: np.random.Generator) -> str:
    """A wrong answer close to the right one: a neighbouring chapter, or the verse with two words swapped."""
    if item["kind"] == "reference":
        book, _, chapter = item["answer"].rpartition(" ")
        return f"{book} {int(chapter) + 1 if chapter == '1' or rng.random() < 0.5 else int(chapter) - 1}"
    words = item["answer"].split()
    if len(words) < 2:
        return item["answer"] + " " + item["answer"]
    i = int(rng.integers(0, len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words) if words != item["answer"].split() else item["answer"] + " and"


def kind_of(question: str) -> str:
    """The task kind a question belongs to ("other" for a question not from this task)."""
    if question.startswith("Which book and chapter says"):
        return "reference"
    return "continue" if question.startswith("Quote what follows in") else "other"


def book_of(item: dict) -> str:
    """The book an item is about: its answer's for `reference`, the one its question names for `continue`."""
    if item["kind"] == "reference":
        return item["answer"].rpartition(" ")[0]
    return item["messages"][0]["content"].split(": ", 1)[0].removeprefix("Quote what follows in ").rpartition(" ")[0]


def same_shape(a: str, b: str) -> bool:
    """As many words and about as many characters: a summed log-probability then compares content, not length."""
    return len(a.split()) == len(b.split()) and abs(len(a) - len(b)) <= max(2, len(a) // 10)


def far_miss(item: dict, pool: dict[str, list[tuple[str, str]]], rng: np.random.Generator, tries: int = 400) -> str:
    """The answer of a random item of the same kind from another book, of the same shape where one is found in
    `tries` draws (else the closest in length drawn); pool: kind -> [(book, answer)] of the split. A near miss when
    the pool has no other book."""
    candidates, book, answer = pool[item["kind"]], book_of(item), item["answer"]
    if all(b == book for b, _ in candidates):
        return corrupt(item, rng)
    best = None
    for _ in range(tries):
        b, other = candidates[int(rng.integers(len(candidates)))]
        if b == book:
            continue
        if same_shape(answer, other):
            return other
        if best is None or abs(len(other) - len(answer)) < abs(len(best) - len(answer)):
            best = other
    return best if best is not None else corrupt(item, rng)


def preference_pairs(items: list[dict], seed: int = 0, rejected: str = "near") -> list[dict]:
    """DPO pairs from task items (all of one split): chosen = the answer, rejected built as REJECTED[rejected] says."""
    if rejected not in REJECTED:
        raise UserError(f"unknown rejected-answer construction '{rejected}'; choose from {', '.join(REJECTED)}")
    rng = np.random.default_rng([seed, 2])
    pool: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        pool.setdefault(item["kind"], []).append((book_of(item), item["answer"]))
    wrong = (lambda item: corrupt(item, rng)) if rejected == "near" else (lambda item: far_miss(item, pool, rng))
    return [{"prompt": item["messages"][:-1], "chosen": item["answer"], "rejected": wrong(item)} for item in items]


def pairs_name(rejected: str) -> str:
    """The DPO pairs file's stem: kjv-pairs (near misses, the original name) or kjv-pairs-<construction>."""
    return "kjv-pairs" if rejected == "near" else f"kjv-pairs-{rejected}"


def write_task(out_dir: str | Path, rejected: tuple[str, ...] = REJECTED, **kwargs) -> dict[str, Path]:
    """kjv-train.jsonl and kjv-test.jsonl (chat lines `gigafactory sft` reads, plus kind and answer), and DPO pairs
    from the training items for each rejected-answer construction (kjv-pairs.jsonl: near, kjv-pairs-far.jsonl)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(**kwargs)
    paths = {}
    for name, records in task.items():
        paths[name] = out / f"kjv-{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    for style in rejected:
        name = pairs_name(style).removeprefix("kjv-")
        paths[name] = out / f"{pairs_name(style)}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(task["train"], rejected=style)))
    return paths
