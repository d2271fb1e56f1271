"""`gigafactory eval`: held-out perplexity of the pre-training data, and the KJV instruction task (tasks.py): its
exact match under greedy decoding with serve's chat template, and continuous scores that move long before exact
match does (task_metrics.py: answer log-likelihood and token accuracy, preference accuracy on held-out pairs).
Greedy decoding is slow, teacher-forced preference scoring cheap, so they are sized apart: exact match on `limit`
test items, preferences on `pref_limit` (by default every held-out item). Per-item scores are kept in the JSON so
two results compare item by item (paired.py). Results go to a JSON file and a table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gigafactory.data.chat import ChatTemplate
from gigafactory.data.loader import PackedSequenceLoader
from gigafactory.data.shards import open_split, prepare_dataset
from gigafactory.data.tokenizer import plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.inference.generate import LoadedModel, generate_tokens, load_for_inference
from gigafactory.inference.sampling import SamplingParams
from gigafactory.data.preference import read_preference_jsonl
from gigafactory.posttrain.task_metrics import answer_scores, item_key, preference_scores, score_pairs
from gigafactory.posttrain.tasks import REJECTED, build_task, exact_match, kind_of


@torch.no_grad()
def heldout_perplexity(loaded: LoadedModel, batches: int, batch_size: int = 4) -> dict:
    """exp(mean token loss) over the first `batches` batches of the pre-training data's held-out split, tokenized
    with the checkpoint's own tokenizer (the same ids, so the same split, as pre-training's)."""
    d = loaded.config.data
    dataset = prepare_dataset(d.inputs, loaded.config.model.vocab_size, d.cache_dir, d.val_fraction, d.seed,
                              str(loaded.checkpoint / "tokenizer.json"))
    val = open_split(dataset, "val")
    if (len(val) - 1) // d.seq_len < 1:
        raise UserError(f"the held-out split has {len(val)} tokens, less than one sequence of {d.seq_len + 1}; raise data.val_fraction")
    batch_size = min(batch_size, (len(val) - 1) // d.seq_len)
    loader = PackedSequenceLoader(val, d.seq_len, batch_size, 0, shuffle=False)
    n = min(batches, loader.n_windows // batch_size)
    device = next(loaded.model.parameters()).device
    losses = [float(loaded.model(x.to(device), targets_BS=y.to(device))) for x, y in (loader.next_batch() for _ in range(n))]
    loss = sum(losses) / len(losses)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n * batch_size * d.seq_len}


@torch.no_grad()
def task_scores(loaded: LoadedModel, items: list[dict], max_new_tokens: int = 16, pref_items: list[dict] | None = None,
                rejected: tuple[str, ...] = ("near",)) -> dict:
    """Exact match (greedy) overall and per kind with each item's hit (`per_item`: [key, kind, hit]), the
    teacher-forced answer scores, and the preference accuracy on `pref_items` (default `items`) for each
    rejected-answer construction (task_metrics.py). An item whose prompt and answer do not fit the model's context
    counts as a miss for exact match (reported as too_long)."""
    tok = loaded.tokenizer
    template = ChatTemplate(tok, plain_text_encoder(tok))
    hits: dict[str, list[bool]] = {}
    examples, too_long, per_item = [], 0, []
    for item in items:
        prompt = template.encode(item["messages"][:-1])
        answer_len = len(template.encoder.encode(item["answer"]).ids)
        if len(prompt) + answer_len >= loaded.model.cfg.max_seq_len:  # cannot be answered in this context: a miss
            too_long += 1
            hits.setdefault(item["kind"], []).append(False)
            per_item.append([item_key(item["messages"]), item["kind"], False])
            continue
        out = list(generate_tokens(loaded.model, prompt, SamplingParams(temperature=0.0, max_tokens=max(max_new_tokens, answer_len + 4))))
        prediction = tok.decode(out)
        hits.setdefault(item["kind"], []).append(exact_match(prediction, item["answer"]))
        per_item.append([item_key(item["messages"]), item["kind"], hits[item["kind"]][-1]])
        if len(examples) < 5:
            examples.append({"question": item["messages"][-2]["content"], "answer": item["answer"], "prediction": prediction})
    every = [h for hs in hits.values() for h in hs]
    return {"exact_match": sum(every) / len(every), "items": len(every), "too_long": too_long,
            **answer_scores(loaded.model, template, items),
            "preference": {style: preference_scores(loaded.model, template, pref_items or items, rejected=style) for style in rejected},
            "by_kind": {k: {"exact_match": sum(v) / len(v), "items": len(v)} for k, v in sorted(hits.items())},
            "examples": examples, "per_item": per_item}


def evaluate_checkpoint(path: str, device: str = "cpu", limit: int = 200, ppl_batches: int = 8, pref_limit: int = 0,
                        rejected: tuple[str, ...] = REJECTED, pref_data: tuple[str, ...] = ()) -> dict:
    """Held-out perplexity and the KJV task: exact match on `limit` test items, preferences on `pref_limit` held-out
    items (0: all of them), one pair per item for each rejected-answer construction; and the preference accuracy on
    each `pref_data` pairs file (e.g. DPO's own training pairs: in-sample, against held-out), stored as
    preference["file:NAME"]."""
    if limit < 1 or pref_limit < 0:
        raise UserError("--limit must be at least 1 and --pref-limit at least 0 (0: every held-out item)")
    unknown = sorted(set(rejected) - set(REJECTED))
    if unknown or not rejected:
        raise UserError(f"--rejected takes a comma list of {', '.join(REJECTED)}; got '{','.join(rejected)}'")
    files = {Path(f).name: [{**p, "kind": kind_of(p["messages"][-1]["content"])} for p in read_preference_jsonl(f)] for f in pref_data}
    loaded = load_for_inference(path, device)
    test = build_task()["test"][:limit]
    held_out = build_task(max_test=pref_limit or 10**9)["test"]
    result = {"checkpoint": str(loaded.checkpoint), "heldout": heldout_perplexity(loaded, ppl_batches),
              "kjv_task": task_scores(loaded, test, pref_items=held_out, rejected=tuple(rejected))}
    template = ChatTemplate(loaded.tokenizer, plain_text_encoder(loaded.tokenizer))
    for name, pairs in files.items():
        result["kjv_task"]["preference"][f"file:{name}"] = score_pairs(loaded.model, template, pairs)
    return result


def table(result: dict) -> str:
    """A markdown table of the headline numbers, of the sections present: an eval during training
    (train/evaluation.py) has the trainer's eval loss instead of the held-out perplexity, exact match only when asked
    for, and no KJV rows when it ran lm-eval tasks alone."""
    h, t = result.get("heldout"), result.get("kjv_task") or {"preference": None}
    lines = ["| metric | value |", "|---|---|"]
    if "eval_loss" in result:
        lines.append(f"| training eval loss (step {result['step']}) | {result['eval_loss']:.4f} |")
    if h:
        lines += [f"| held-out loss | {h['loss']:.4f} |", f"| held-out perplexity | {h['perplexity']:.2f} |"]
    if "exact_match" in t:
        lines += [f"| KJV task exact match ({t['items']} items) | {t['exact_match']:.3f} |",
                  *(f"| - {k} ({v['items']}) | {v['exact_match']:.3f} |" for k, v in t["by_kind"].items())]
    if "answer_logp_per_token" in t:
        lines += [f"| KJV answer log-likelihood per token | {t['answer_logp_per_token']:.4f} |",
                  f"| KJV answer token accuracy | {t['answer_token_accuracy']:.3f} |"]
    for style, p in (t["preference"] or {}).items():
        if p:
            name = f"pairs of {style[5:]} ({p['pairs']})" if style.startswith("file:") else f"{style} misses ({p['pairs']} held-out pairs)"
            lines += [f"| KJV preference accuracy, {name} | {p['preference_accuracy']:.3f} |",
                      *(f"| - {k} ({v['pairs']}) | {v['preference_accuracy']:.3f} |" for k, v in p["by_kind"].items()),
                      f"| KJV preference margin, {style} (nats) | {p['preference_margin']:.3f} |"]
    for task, metrics in result.get("harness", {}).items():  # lm-eval tasks (--harness-tasks)
        lines += [f"| lm-eval {task}: {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(f"Evaluation of `{result['checkpoint']}`\n\n{table(result)}\n")
    return out, md
