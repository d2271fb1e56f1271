"""Read a run's inputs from `gigafactory plan --json` output.

Keys read from one plan entry (all numbers):
  gpus               GPUs of that cluster size (required; used to pick the entry)
  step_time_s        seconds per optimizer step (required)
  tokens_per_step    tokens per optimizer step (required)
  checkpoint_time_s  seconds to write one checkpoint (optional; `checkpoint_s` is accepted too)
  replica_group_gpus GPUs of one replica group, gpus_used / dp_replicate (optional; for --recovery replica)
  params             model parameters (optional; sizes the state a rejoining group receives)

Accepted shapes: one entry object; a list of entries; or an object holding such a list under any key (for example
{"results": [...]}). The entry whose `gpus` equals the requested count is used; with no count requested, the first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gigafactory.errors import UserError

REQUIRED = ("gpus", "step_time_s", "tokens_per_step")
CHECKPOINT_KEYS = ("checkpoint_time_s", "checkpoint_s")
OPTIONAL = ("replica_group_gpus", "params")


def read_plan(path: str, gpus: int | None = None) -> dict[str, float]:
    """{gpus, step_time_s, tokens_per_step[, checkpoint_s]} from the plan entry for `gpus` (or the first entry)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan file {path!r} not found; pass the output of `gigafactory plan --json` to --from-plan")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"plan file {path!r} is not valid JSON ({err.__class__.__name__}); write it with `gigafactory plan --json > FILE`") from None
    entries = _entries(data)
    if not entries:
        raise UserError(f"plan file {path!r} has no entry with a 'gpus' key; expected `gigafactory plan --json` output")
    if gpus is None:
        entry = entries[0]
    else:
        matches = [e for e in entries if _number(e.get("gpus")) == gpus]
        if not matches:
            sizes = ", ".join(str(e.get("gpus")) for e in entries)
            raise UserError(f"plan file {path!r} has no entry for --gpus {gpus} (it has: {sizes}); pick one of those or re-run plan")
        entry = matches[0]
    out: dict[str, float] = {}
    for key in REQUIRED:
        out[key] = _positive(entry, key, path)
    for key in CHECKPOINT_KEYS:
        if entry.get(key) is not None:
            out["checkpoint_s"] = _positive(entry, key, path, allow_zero=True)
            break
    for key in OPTIONAL:
        if entry.get(key) is not None:
            out[key] = _positive(entry, key, path)
    out["gpus"] = int(out["gpus"])
    if "replica_group_gpus" in out:
        out["replica_group_gpus"] = int(out["replica_group_gpus"])
    return out


def _entries(data) -> list[dict]:
    if isinstance(data, dict) and "gpus" in data:
        return [data]
    if isinstance(data, list):
        return [e for e in data if isinstance(e, dict) and "gpus" in e]
    if isinstance(data, dict):
        for value in data.values():
            found = _entries(value) if isinstance(value, (list, dict)) else []
            if found:
                return found
    return []


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _positive(entry: dict, key: str, path: str, allow_zero: bool = False) -> float:
    value = _number(entry.get(key))
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"plan file {path!r}: {key}={entry.get(key)!r} must be a positive number")
    return value
