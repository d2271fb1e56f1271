"""Pick the nodes a job trains on from per-node health reports: every node of the allocation ran `gigafactory health`
on its own (a job's pre-step), and here all their ranks are judged together against the fleet median, so a node
that looked fine alone but is slower than the rest of the allocation is dropped too.

A node is dropped when its report is missing or unreadable (its check crashed or timed out), when any of its ranks
is bad in the fleet-wide judgement, or when it is listed in a bad-nodes file (a straggler named by an earlier
attempt of the job). The job gets the first `need` healthy nodes in allocation order; fewer is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.fleet.health import LINKS, THROUGHPUT, judge


def read_reports(directory: Path, candidates: list[str]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """({node: its ranks' measurements}, {node: why it has none}) from DIR/<node>.json."""
    ranks, missing = {}, {}
    for node in candidates:
        path = directory / f"{node}.json"
        try:
            report = json.loads(path.read_text())
            node_ranks = [r for r in report["ranks"] if isinstance(r, dict)]
        except FileNotFoundError:
            missing[node] = "no health report (the check crashed or timed out)"
            continue
        except (OSError, ValueError, KeyError, TypeError) as err:
            missing[node] = f"unreadable health report ({type(err).__name__})"
            continue
        if not node_ranks:
            missing[node] = "health report lists no ranks"
            continue
        flaw = next(filter(None, map(_flaw, node_ranks)), "")
        if flaw:  # a probe that wrote nonsense is a broken node, and must not break the judgement of the others
            missing[node] = f"malformed health report ({flaw})"
            continue
        ranks[node] = node_ranks
    return ranks, missing


def _flaw(rank: dict) -> str:
    """'' for a rank whose fields have the types judge() reads, else what is wrong (NaN throughput included)."""
    errors = rank.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        return "errors is not a list of strings"
    if not isinstance(rank.get("numerics"), (str, int, type(None))):
        return "numerics is not a digest"
    for key in (*THROUGHPUT, *LINKS, "ecc_uncorrected"):
        value = rank.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return f"{key} = {value!r} is not a finite number"
    return ""


def read_bad_nodes(path: Path | None) -> set[str]:
    """Names in a bad-nodes file ({"bad_nodes": [...]} or a plain list); an absent file lists none."""
    if path is None or not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"--bad-nodes {str(path)!r}: not valid JSON") from None
    names = data.get("bad_nodes", []) if isinstance(data, dict) else data
    if not isinstance(names, list):
        raise UserError(f"--bad-nodes {str(path)!r}: expected a list of hostnames or {{\"bad_nodes\": [...]}}")
    return {str(n) for n in names}


def pick_nodes(candidates: list[str], reports_dir: Path, need: int, slow_ratio: float, bad_nodes_file: Path | None = None) -> dict:
    """{"chosen": [...], "dropped": {node: [reasons]}, "report": the fleet-wide judgement}; UserError if too few."""
    if need < 1:
        raise UserError(f"--pick {need} must be >= 1")
    if not candidates:
        raise UserError("--candidates lists no nodes")
    twice = sorted({n for n in candidates if candidates.count(n) > 1})
    if twice:
        raise UserError(f"--candidates names {', '.join(twice[:3])} twice; a node can train only once")
    if any("/" in n or n in (".", "..") for n in candidates):
        raise UserError(f"--candidates {','.join(candidates)[:80]!r}: node names, not paths")
    if not reports_dir.is_dir():
        raise UserError(f"--reports {str(reports_dir)!r} is not a directory (the job's pre-step makes it before the checks)")
    ranks, missing = read_reports(reports_dir, candidates)
    listed = read_bad_nodes(bad_nodes_file)
    everyone = []
    for node in candidates:  # global rank numbers, in allocation order, so reasons name one rank each
        for r in ranks.get(node, []):
            everyone.append({**r, "node": node, "node_rank": r.get("rank"), "rank": len(everyone)})
    report = judge(everyone, slow_ratio) if everyone else {"nodes": {}, "bad_nodes": []}
    dropped: dict[str, list[str]] = {node: [why] for node, why in missing.items()}
    for node in candidates:
        if node in listed:
            dropped.setdefault(node, []).append(f"listed in {bad_nodes_file} (e.g. a straggler named in an earlier attempt)")
        verdict = report["nodes"].get(node)
        if verdict and verdict["verdict"] == "bad":
            dropped.setdefault(node, []).extend(verdict["reasons"])
    healthy = [n for n in candidates if n not in dropped]
    result = {"chosen": healthy[:need], "spare_left": healthy[need:], "dropped": dropped, "need": need, "report": report}
    if len(healthy) < need:
        why = "; ".join(f"{n}: {reasons[0]}" for n, reasons in list(dropped.items())[:3])
        raise PickError(f"only {len(healthy)} of {len(candidates)} nodes are healthy and the job needs {need} ({why}); "
                        "allocate more spares or repair the nodes", result)
    return result


class PickError(UserError):
    """Too few healthy nodes; carries the result so the report can still be written."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result
