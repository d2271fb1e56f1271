"""Failure classes (read from TOML) and their arrival times on one job.

Each class has a rate per device-day, counted per GPU, per node, or per job (a job-size-independent cause such as a
storage or scheduler outage: the device is the job itself). The job sees the superposition of every device's
failures, so a class's arrivals on the job form one process with rate `rate x devices`; arrivals are drawn for the whole
horizon at once (vectorised), independent of what the job is doing. That makes runs at different checkpoint intervals
share the same failures for a given seed (common random numbers), which is what lets a sweep find the optimum.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gigafactory.config.fields import knob
from gigafactory.errors import UserError
from gigafactory.simulate.config import DAY_S, ClusterSpec

UNITS = ("gpu", "node", "job")


@dataclass
class FailureClass:
    """One cause of failure (a row of the failure-rate TOML)."""

    name: str = knob("", "Class name (table name in the TOML, e.g. gpu, hbm, nic).")
    rate: float = knob(0.0, "Failures per device-day.")
    per: str = knob("gpu", "Device the rate is counted per: gpu, node, or job (rate per job-day, whatever the job's size).", choices=UNITS)
    detect_s: float = knob(300.0, "Time from the failure until the job is declared dead (watchdog / health check).")
    repair_s: float = knob(0.0, "Time the failed node is out for repair or replacement; 0 = nothing to replace (restart only).")
    nodes_affected: int = knob(
        1, "Neighbouring nodes taken out at once (a rack or leaf switch: several); >1 defeats in-memory recovery under "
        "job-restart, and under replica every group the block touches drops.",
    )
    kills_job: bool = knob(True, "Whether the synchronous job dies (false: counted, no interruption).")
    hangs: bool = knob(False, "The failure shows as a hang, not a crash: replica survivors wait for the torchft timeout to drop the group.")
    spreads: bool = knob(
        False, "The fault spoils every replica (silent data corruption is averaged into all gradients): no replica group "
        "can absorb it and in-memory snapshots after it are bad, so the job restarts from durable storage.",
    )
    outage_s: float = knob(0.0, "A shared service (storage, scheduler) is down this long: the job cannot restart before it is back.")
    source: str = knob("", "Where the rate comes from (paper, table, derivation).")

    def devices(self, cluster: ClusterSpec) -> int:
        return {"gpu": cluster.gpus, "node": cluster.nodes, "job": 1}[self.per]

    def rate_per_s(self, cluster: ClusterSpec) -> float:
        """Arrival rate of this class on the whole job, per second."""
        return self.rate * cluster.rate_scale * self.devices(cluster) / DAY_S


_FIELDS = {f.name for f in dataclasses.fields(FailureClass)} - {"name"}


def default_rates_path() -> Path:
    return Path(str(resources.files("gigafactory.simulate") / "failure_rates.toml"))


def load_failure_classes(path: str | Path | None = None) -> list[FailureClass]:
    """Read `[classes.<name>]` tables from a TOML file (default: the shipped, cited one)."""
    p = Path(path) if path else default_rates_path()
    if not p.is_file():
        raise UserError(f"failure-rate file {str(p)!r} not found; pass an existing TOML file to --failure-rates")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"failure-rate file {str(p)!r} is not valid TOML ({err}); fix the syntax") from None
    unknown_top = set(raw) - {"classes", "meta"}
    if unknown_top:
        raise UserError(f"failure-rate file {str(p)!r}: unknown table [{sorted(unknown_top)[0]}]; use [classes.<name>] (and optional [meta])")
    tables = raw.get("classes")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"failure-rate file {str(p)!r} has no [classes.<name>] tables; add at least one failure class")
    return [_parse_class(name, table, p) for name, table in tables.items()]


def _parse_class(name: str, table: dict, path: Path) -> FailureClass:
    where = f"{path.name} [classes.{name}]"
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table")
    bad = set(table) - _FIELDS
    if bad:
        raise UserError(f"{where}: unknown key {sorted(bad)[0]!r}; valid keys: {', '.join(sorted(_FIELDS))}")
    if "rate" not in table:
        raise UserError(f"{where}: missing 'rate' (failures per device-day)")
    cls = FailureClass(name=name, **table)
    validate_class(cls, where)
    return cls


def validate_class(cls: FailureClass, where: str | None = None) -> None:
    where = where or f"failure class {cls.name!r}"
    for key in ("rate", "detect_s", "repair_s", "outage_s"):
        value = getattr(cls, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: {key}={value!r} must be a number >= 0 (negative rates and times are meaningless)")
    if cls.per not in UNITS:
        raise UserError(f"{where}: per={cls.per!r} is not one of: {', '.join(UNITS)}")
    if isinstance(cls.nodes_affected, bool) or not isinstance(cls.nodes_affected, int) or cls.nodes_affected < 1:
        raise UserError(f"{where}: nodes_affected={cls.nodes_affected!r} must be an integer >= 1")
    for key in ("kills_job", "hangs", "spreads"):
        if not isinstance(getattr(cls, key), bool):
            raise UserError(f"{where}: {key} must be true or false")
    if cls.per == "job" and (cls.repair_s or cls.nodes_affected != 1):
        raise UserError(f"{where}: a per-job class takes no node out; set repair_s = 0 and nodes_affected = 1 (use outage_s for how long the service is down)")


def override_rates(classes: list[FailureClass], overrides: dict[str, float]) -> list[FailureClass]:
    """Return classes with `rate` replaced for the named ones; an unknown name is a one-line error."""
    by_name = {c.name: c for c in classes}
    for name in overrides:
        if name not in by_name:
            raise UserError(f"unknown component {name!r} in --rate; known components: {', '.join(by_name)}")
    out = [dataclasses.replace(c, rate=overrides.get(c.name, c.rate)) for c in classes]
    for c in out:
        validate_class(c)
    return out


def job_mtbi_s(classes: list[FailureClass], cluster: ClusterSpec) -> float:
    """Mean time between job-killing failures on this cluster (inf if nothing kills the job)."""
    total = sum(c.rate_per_s(cluster) for c in classes if c.kills_job)
    return 1.0 / total if total > 0 else math.inf


def sample_arrivals(
    classes: list[FailureClass], cluster: ClusterSpec, horizon_s: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """All failure times in [0, horizon) and their class indices, sorted by time.

    Each class draws from its own stream (SeedSequence(seed).spawn), so editing one class leaves the others' arrivals
    unchanged. Weibull: each class's aggregate process is a renewal process whose gaps are Weibull(k) with the class's
    mean gap (an approximation: the exact superposition of many Weibull devices tends to Poisson as devices grow).
    """
    streams = np.random.SeedSequence(seed).spawn(len(classes))
    times, kinds = [], []
    for idx, (cls, stream) in enumerate(zip(classes, streams)):
        rate = cls.rate_per_s(cluster)
        if rate <= 0:
            continue
        rng = np.random.default_rng(stream)
        mean_gap = 1.0 / rate
        t = _renewal_times(rng, mean_gap, horizon_s, cluster.distribution, cluster.weibull_shape)
        times.append(t)
        kinds.append(np.full(t.shape, idx, dtype=np.int64))
    if not times:
        return np.empty(0), np.empty(0, dtype=np.int64)
    t_all, k_all = np.concatenate(times), np.concatenate(kinds)
    order = np.argsort(t_all, kind="stable")
    return t_all[order], k_all[order]


def sample_positions(n: int, seed: int) -> np.ndarray:
    """One uniform number in [0, 1) per failure: where in the job (which node) it strikes.

    Its own stream, so the arrival times of every class, and the job-restart run of the same seed, are unchanged.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, 0x9E3779B9])).random(n)


def _renewal_times(rng: np.random.Generator, mean_gap: float, horizon_s: float, law: str, shape: float) -> np.ndarray:
    chunks, t_end = [], 0.0
    batch = max(16, int(1.2 * horizon_s / mean_gap) + 16)
    while t_end < horizon_s:
        if law == "weibull":
            gaps = rng.weibull(shape, batch) * (mean_gap / math.gamma(1.0 + 1.0 / shape))
        else:
            gaps = rng.exponential(mean_gap, batch)
        t = t_end + np.cumsum(gaps)
        chunks.append(t)
        t_end = float(t[-1])
    t = np.concatenate(chunks)
    return t[t < horizon_s]
