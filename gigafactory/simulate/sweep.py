"""`--sweep KEY=V1,V2,...`: run the same job at several values of one knob and tabulate the results.

KEY is any numeric field of the cluster, job, sim or recovery spec (gpus, spare_nodes, checkpoint_s, rate_scale,
quorum_s, ...), or `checkpoint_interval` (seconds of compute between checkpoints; implies checkpoint_policy=fixed).
"""

from __future__ import annotations

import dataclasses
import typing

from gigafactory.errors import UserError
from gigafactory.simulate.config import SimConfig
from gigafactory.simulate.failures import FailureClass
from gigafactory.simulate.runner import Report, simulate

ALIASES = {"checkpoint_interval": "checkpoint_interval_s", "interval": "checkpoint_interval_s"}
_NUMERIC = (int, float)


def sweepable(cfg: SimConfig) -> dict[str, tuple[str, type]]:
    """Knob name -> (spec attribute on SimConfig, value type), for every numeric knob."""
    out = {}
    for spec_name in ("cluster", "job", "sim", "recovery"):
        spec = getattr(cfg, spec_name)
        hints = typing.get_type_hints(type(spec))
        for f in dataclasses.fields(spec):
            if hints[f.name] in _NUMERIC:
                out[f.name] = (spec_name, hints[f.name])
    return out


def parse_sweep(text: str, cfg: SimConfig) -> tuple[str, list]:
    """'gpus=10000,100000' -> ('gpus', [10000, 100000]); names the problem in one line otherwise."""
    key, sep, values = text.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    known = sweepable(cfg)
    if not sep or not values.strip():
        raise UserError(f"--sweep {text!r} must look like KEY=V1,V2 (for example checkpoint_interval=600,1200 or gpus=10000,100000)")
    if key not in known:
        raise UserError(f"--sweep: unknown knob {key!r}; sweepable: checkpoint_interval, {', '.join(sorted(known))}")
    kind = known[key][1]
    try:
        parsed = [kind(float(v)) if kind is int else float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep {key}: values must be numbers separated by commas, got {values!r}") from None
    if kind is int and any(float(v) != int(float(v)) for v in values.split(",") if v.strip()):
        raise UserError(f"--sweep {key}: values must be integers, got {values!r}")
    if not parsed:
        raise UserError(f"--sweep {key}: give at least one value")
    return key, parsed


def with_value(cfg: SimConfig, key: str, value) -> SimConfig:
    spec_name, _ = sweepable(cfg)[key]
    changes = {key: value}
    if key == "checkpoint_interval_s":
        changes["checkpoint_policy"] = "fixed"
    spec = dataclasses.replace(getattr(cfg, spec_name), **changes)
    return dataclasses.replace(cfg, **{spec_name: spec})


def run_sweep(cfg: SimConfig, key: str, values: list, classes: list[FailureClass] | None = None) -> list[tuple[float, Report]]:
    """(value, report) for every value, same seeds at every point (common random numbers)."""
    return [(value, simulate(with_value(cfg, key, value), classes)) for value in values]


def sweep_rows(key: str, results: list[tuple[float, Report]]) -> list[dict]:
    rows = []
    for value, report in results:
        d = report.to_dict()
        rows.append({
            key: value,
            "ettr": d["ettr"], "ettr_std": d["ettr_std"], "expected_ettr": d["expected"]["ettr"],
            "interval_s": d["inputs"]["checkpoint_interval_s"], "spare_nodes": d["inputs"]["spare_nodes"],
            "interruptions": d["interruptions"], "mtbi_s": d["mtbi_s"],
            "goodput_tokens_per_s": d["goodput_tokens_per_s"], "lost_gpu_hours": d["lost_gpu_hours"],
        })
    best = max(range(len(rows)), key=lambda i: rows[i]["ettr"])
    for i, row in enumerate(rows):
        row["best"] = i == best
    return rows
