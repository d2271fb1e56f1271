"""Paired comparison of two eval results on the same held-out items (`gigafactory eval --compare A.json B.json`).

Two checkpoints scored on the same items differ by much less noise than two independent samples: item difficulty
cancels. For each per-item score both JSONs carry (preference margins for each rejected-answer construction, exact
match hits), on the items they share:
  - the accuracy difference B - A with a percentile bootstrap 95% CI (items resampled, seeded);
  - the exact McNemar test: of the discordant items (right in one, wrong in the other), is the split 50/50?
    Two-sided binomial p-value, exact (no normal approximation), so it holds for few discordant items;
  - for preferences also the mean margin difference with its bootstrap CI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gigafactory.errors import UserError

BOOTSTRAP_SAMPLES = 10_000


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) for Binomial(a_only + b_only, 1/2)."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    from math import comb

    tail = sum(comb(n, i) for i in range(k + 1))  # exact integers: no underflow for thousands of items
    return min(1.0, 2 * tail / 2**n)


def bootstrap_ci(diff: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile 95% CI of the mean of per-item differences, resampling items with replacement."""
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # in chunks: bounded memory for large item sets
        idx = rng.integers(0, len(diff), (min(1000, samples - start), len(diff)))
        means[start:start + len(idx)] = diff[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_accuracy(a: dict[str, bool], b: dict[str, bool], seed: int = 0) -> dict:
    """Accuracy of A and B on their shared keys, B - A with its bootstrap CI, and the exact McNemar test."""
    keys = sorted(a.keys() & b.keys())
    if not keys:
        raise UserError("the two results share no items: were they scored on the same task and split?")
    x = np.array([a[k] for k in keys], float)
    y = np.array([b[k] for k in keys], float)
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    lo, hi = bootstrap_ci(y - x, seed)
    return {"items": len(keys), "accuracy_a": float(x.mean()), "accuracy_b": float(y.mean()),
            "difference": float((y - x).mean()), "ci95": [lo, hi],
            "a_right_b_wrong": a_only, "b_right_a_wrong": b_only, "mcnemar_p": mcnemar_exact_p(a_only, b_only)}


def _unique(rows: list) -> list:
    """Rows with the n-th repeat of a key renamed key#n: the task holds a few identical items (a sentence said twice
    in one chapter), scored in the same order by every eval, so the n-th copies pair up."""
    seen: dict[str, int] = {}
    out = []
    for key, *rest in rows:
        seen[key] = seen.get(key, 0) + 1
        out.append([key if seen[key] == 1 else f"{key}#{seen[key]}", *rest])
    return out


def _preference_sets(result: dict) -> dict[str, dict[str, tuple[str, float]]]:
    """{rejected construction: {pair key: (kind, margin)}} of an eval result."""
    prefs = result["kjv_task"].get("preference") or {}
    return {style: {key: (kind, margin) for key, kind, margin in _unique(p["per_pair"])}
            for style, p in prefs.items() if isinstance(p, dict) and "per_pair" in p}


def compare_results(a: dict, b: dict, seed: int = 0) -> dict:
    """Every paired comparison the two eval results allow (see the module docstring)."""
    out: dict = {"a": a.get("checkpoint", "?"), "b": b.get("checkpoint", "?"), "preference": {}}
    pa, pb = _preference_sets(a), _preference_sets(b)
    for style in sorted(pa.keys() & pb.keys()):
        sa, sb = pa[style], pb[style]
        if not sa.keys() & sb.keys():  # pairs drawn under another --pref-limit / eval.limit: other rejected answers
            out.setdefault("unpaired", []).append(f"preference ({style})")
            continue
        entry = {"all": paired_accuracy({k: m > 0 for k, (_, m) in sa.items()}, {k: m > 0 for k, (_, m) in sb.items()}, seed)}
        keys = sorted(sa.keys() & sb.keys())
        margin_diff = np.array([sb[k][1] - sa[k][1] for k in keys])
        entry["all"]["margin_difference"] = float(margin_diff.mean())
        entry["all"]["margin_ci95"] = list(bootstrap_ci(margin_diff, seed))
        for kind in sorted({kind for kind, _ in sa.values()}):
            ka = {k: m > 0 for k, (kd, m) in sa.items() if kd == kind}
            kb = {k: m > 0 for k, (kd, m) in sb.items() if kd == kind}
            if ka.keys() & kb.keys():
                entry[kind] = paired_accuracy(ka, kb, seed)
        out["preference"][style] = entry
    ha, hb = a["kjv_task"].get("per_item"), b["kjv_task"].get("per_item")
    if ha and hb:
        hits_a, hits_b = ({k: bool(h) for k, _, h in _unique(rows)} for rows in (ha, hb))
        if hits_a.keys() & hits_b.keys():
            out["exact_match"] = paired_accuracy(hits_a, hits_b, seed)
        else:
            out.setdefault("unpaired", []).append("exact match")
    if not out["preference"] and "exact_match" not in out:
        if out.get("unpaired"):
            raise UserError(f"the two results share no items ({', '.join(out['unpaired'])}): score both with the same "
                            "--limit and --pref-limit (eval.limit during training), which choose the items and draw their pairs")
        raise UserError("neither result has per-item scores (eval JSONs written before per-item scores were kept); re-run eval")
    return out


def load_result(path: str) -> dict:
    """An eval JSON (`gigafactory eval`'s, or training's RUN/eval-step-N.json) whose per-item rows compare_results can
    read; anything else is one line naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"'{p}' {'is a directory' if p.is_dir() else 'not found'}; pass an eval JSON written by `gigafactory eval`")
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON
        result = None
    problem = _malformed(result)
    if problem:
        raise UserError(f"'{p}' is not an eval JSON written by `gigafactory eval` ({problem}); re-run eval to write it again")
    return result


def _malformed(result) -> str:
    """What in a loaded eval JSON compare_results could not read, or ''."""
    task = result.get("kjv_task") if isinstance(result, dict) else None
    if not isinstance(task, dict):
        return "no kjv_task object"

    def bad_rows(rows, last) -> bool:
        return not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], str) and last(r[2]) for r in rows)

    if bad_rows(task.get("per_item", []), lambda hit: isinstance(hit, bool)):
        return "kjv_task.per_item must be [key, kind, hit] rows"
    prefs = task.get("preference") or {}
    if not isinstance(prefs, dict):
        return "kjv_task.preference must be an object"
    for style, pref in prefs.items():
        if isinstance(pref, dict) and bad_rows(pref.get("per_pair", []), lambda m: type(m) in (int, float) and math.isfinite(m)):
            return f"kjv_task.preference.{style}.per_pair must be [key, kind, finite margin] rows"
    return ""


def _row(name: str, c: dict) -> str:
    lo, hi = c["ci95"]
    return (f"| {name} | {c['items']} | {c['accuracy_a']:.3f} | {c['accuracy_b']:.3f} | {c['difference']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] | {c['a_right_b_wrong']} / {c['b_right_a_wrong']} | {c['mcnemar_p']:.2g} |")


def comparison_table(cmp: dict) -> str:
    lines = [f"A = `{cmp['a']}`, B = `{cmp['b']}`", "",
             "| score | items | A | B | B - A [95% CI] | A-only / B-only right | McNemar p |", "|---|---|---|---|---|---|---|"]
    for style, entry in cmp["preference"].items():
        for kind, c in entry.items():
            lines.append(_row(f"preference ({style}){'' if kind == 'all' else ' - ' + kind}", c))
    if "exact_match" in cmp:
        lines.append(_row("exact match", cmp["exact_match"]))
    if cmp.get("unpaired"):
        lines.append(f"\nnot compared (no shared items: other --limit / --pref-limit): {', '.join(cmp['unpaired'])}")
    for style, entry in cmp["preference"].items():
        lo, hi = entry["all"]["margin_ci95"]
        lines.append(f"\nmean margin change ({style}): {entry['all']['margin_difference']:+.3f} nats [{lo:+.3f}, {hi:+.3f}]")
    return "\n".join(lines)
