"""Hardware catalog: GPUs, scale-out networks and a cluster built from them, read from `hardware.toml`.

Every number lives in the TOML file next to its source; this module only types it and checks user files.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gigafactory.config.fields import knob
from gigafactory.errors import UserError

CATALOG_PATH = Path(__file__).with_name("hardware.toml")


@dataclass(frozen=True)
class GPU:
    """One accelerator model and the server it ships in."""

    name: str = knob("h100", "Catalog key of the GPU.")
    bf16_tflops: float = knob(989.0, "Dense bf16 tensor-core peak, TFLOP/s (the MFU denominator).")
    fp8_tflops: float = knob(0.0, "Dense fp8 tensor-core peak, TFLOP/s (0 = not supported).")
    hbm_gb: float = knob(80.0, "HBM capacity, GB (1e9 bytes).")
    hbm_gbps: float = knob(3350.0, "HBM bandwidth, GB/s.")
    nvlink_gbps: float = knob(450.0, "NVLink bandwidth per GPU per direction, GB/s.")
    nvlink_domain: int = knob(8, "GPUs that share one NVLink/NVSwitch domain.")
    gpus_per_node: int = knob(8, "GPUs per server; a cluster's GPU count must be a multiple of it.")
    nic_gbps: float = knob(50.0, "Scale-out NIC bandwidth per GPU per direction, GB/s.")
    tdp_w: float = knob(700.0, "Board power, W.")
    idle_w: float = knob(70.0, "Board power of an idle GPU (clocks parked, HBM refreshed), W.")
    system_w_per_gpu: float = knob(1275.0, "Server maximum power divided by its GPU count, W (CPU, NICs, fans included).")
    sms: int = knob(132, "Streaming multiprocessors (for GEMM wave quantisation).")
    matmul_efficiency: float = knob(0.68, "Fraction of peak a large GEMM sustains inside a training step (calibrated).")
    usd_per_gpu_hour: float = knob(2.0, "Default price per GPU-hour, USD.")


@dataclass(frozen=True)
class Network:
    """A scale-out fabric (InfiniBand fat tree, rail-optimised Ethernet) or the NVLink tier."""

    name: str = knob("ib-ndr", "Catalog key of the network.")
    link_gbps: float = knob(50.0, "Port bandwidth per GPU per direction, GB/s (the NIC's min with this applies).")
    efficiency: float = knob(0.8, "Achieved fraction of link bandwidth in large collectives.")
    latency_us: float = knob(5.0, "Small-message latency of one collective step, microseconds.")
    hop_latency_us: float = knob(0.13, "Extra latency per switch tier crossed, microseconds.")
    radix: int = knob(64, "Switch ports (sets the number of fat-tree tiers).")

    def tiers(self, endpoints: int) -> int:
        """Fat-tree tiers needed for `endpoints` ports: radix * (radix/2)^(t-1) >= endpoints."""
        tiers, reach = 1, self.radix
        while reach < endpoints:
            tiers, reach = tiers + 1, reach * self.radix // 2
        return tiers


@dataclass(frozen=True)
class Cluster:
    """`n_gpus` identical GPUs on one network, with the facility figures the forecast needs."""

    gpu: GPU = knob(factory=GPU, help="The accelerator.")
    network: Network = knob(factory=Network, help="The scale-out fabric.")
    nvlink: Network = knob(factory=Network, help="The NVLink tier (efficiency and latency only).")
    n_gpus: int = knob(8, "GPUs in the cluster (a multiple of gpu.gpus_per_node).")
    pue: float = knob(1.2, "Power usage effectiveness: facility power / IT power.")
    usd_per_gpu_hour: float = knob(2.0, "Price of one GPU-hour, USD.")
    gpu_failures_per_day: float = knob(4.7e-4, "Job-interrupting failures per GPU per day.")
    storage_write_gbps: float = knob(2000.0, "Aggregate checkpoint write bandwidth of the file system, GB/s.")

    @property
    def nic_gbps(self) -> float:
        """Usable scale-out bandwidth per GPU: the slower of NIC and fabric port, times fabric efficiency."""
        return min(self.gpu.nic_gbps, self.network.link_gbps) * self.network.efficiency

    @property
    def nvlink_gbps(self) -> float:
        return self.gpu.nvlink_gbps * self.nvlink.efficiency

    def net_latency_s(self) -> float:
        nodes = max(1, self.n_gpus // self.gpu.gpus_per_node)
        return (self.network.latency_us + 2 * self.network.tiers(nodes) * self.network.hop_latency_us) * 1e-6


@dataclass
class Catalog:
    gpus: dict[str, GPU]
    networks: dict[str, Network]
    defaults: dict[str, float]
    cluster: dict[str, object]  # from a user file's [cluster] table (gpu, network, and Cluster fields)


def _build(cls, name: str, table: dict, where: str):
    fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
    unknown = set(table) - fields - {"source"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)} in [{cls.__name__.lower()}.{name}]; valid: {sorted(fields)}")
    values = {}
    for key in fields & set(table):
        value = table[key]
        low = 0 if key in MAY_BE_ZERO else 1e-9  # the others divide something: 0 would be a ZeroDivisionError
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
            kind = "non-negative" if key in MAY_BE_ZERO else "positive"
            raise UserError(f"{where}: [{cls.__name__.lower()}.{name}] {key}={value!r} must be a finite {kind} number")
        if key in INTEGER_KEYS and value != int(value):
            raise UserError(f"{where}: [{cls.__name__.lower()}.{name}] {key}={value!r} must be a whole number")
        values[key] = int(value) if key in INTEGER_KEYS else value
    return cls(name=name, **values)


MAY_BE_ZERO = {"fp8_tflops", "idle_w", "usd_per_gpu_hour", "latency_us", "hop_latency_us", "system_w_per_gpu"}
INTEGER_KEYS = {"nvlink_domain", "gpus_per_node", "sms", "radix"}


TABLES = ("gpu", "network", "defaults", "cluster")
CLUSTER_KEYS = {"gpu": str, "network": str, "pue": 1.0, "usd_per_gpu_hour": 0.0, "gpu_failures_per_day": 0.0, "storage_write_gbps": 0.0}


def _check_user_tables(data: dict, where: str) -> None:
    """A user file's tables and [cluster] keys are known and its numbers in range: nothing is silently ignored."""
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise UserError(f"{where}: unknown table [{unknown[0]}]; valid tables: {', '.join(f'[{t}]' for t in TABLES)}")
    for table in TABLES:
        entries = data.get(table, {})
        if not isinstance(entries, dict) or (table in ("gpu", "network") and not all(isinstance(t, dict) for t in entries.values())):
            raise UserError(f"{where}: [{table}] must be a table" + (f" of [{table}.NAME] tables" if table in ("gpu", "network") else ""))
    for key, value in data.get("cluster", {}).items():
        if key not in CLUSTER_KEYS:
            raise UserError(f"{where}: unknown key {key!r} in [cluster]; valid: {', '.join(CLUSTER_KEYS)}")
        low = CLUSTER_KEYS[key]
        if low is str:
            if not isinstance(value, str):
                raise UserError(f"{where}: [cluster] {key} must be a name (a string), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= low):
            raise UserError(f"{where}: [cluster] {key}={value!r} must be a finite number >= {low:g}")


def load_catalog(extra: str | None = None) -> Catalog:
    """The shipped catalog, plus the GPUs, networks and [cluster] table of a user TOML file when given."""
    tables = [(CATALOG_PATH, tomllib.loads(CATALOG_PATH.read_text()))]
    if extra:
        path = Path(extra)
        if not path.is_file():
            raise UserError(f"cluster file {extra!r} not found; pass an existing TOML file to --cluster")
        try:
            tables.append((path, tomllib.loads(path.read_text())))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"cluster file {extra!r} is not valid TOML ({err}); fix the syntax") from None
        _check_user_tables(tables[-1][1], f"cluster file {extra!r}")
    gpus: dict[str, GPU] = {}
    networks: dict[str, Network] = {}
    defaults: dict[str, float] = {}
    cluster: dict[str, object] = {}
    for path, data in tables:
        for name, table in data.get("gpu", {}).items():
            base = dataclasses.asdict(gpus[name]) if name in gpus else {}
            base.pop("name", None)
            gpus[name] = _build(GPU, name, {**base, **table}, str(path))
        for name, table in data.get("network", {}).items():
            networks[name] = _build(Network, name, table, str(path))
        defaults.update({k: v for k, v in data.get("defaults", {}).items() if k != "source"})
        cluster.update(data.get("cluster", {}))
    return Catalog(gpus=gpus, networks=networks, defaults=defaults, cluster=cluster)


def default_network(gpu: GPU) -> str:
    return "ib-hdr" if gpu.name.startswith("a100") else "ib-ndr"


def make_cluster(gpu: str, n_gpus: int, *, network: str | None = None, catalog: Catalog | None = None, **overrides) -> Cluster:
    """A Cluster from catalog names; bad names and GPU counts raise a one-line UserError."""
    catalog = catalog or load_catalog()
    if gpu not in catalog.gpus:
        raise UserError(f"unknown GPU {gpu!r}; choose one of: {', '.join(catalog.gpus)} (or add it with --cluster FILE)")
    spec = catalog.gpus[gpu]
    network = network or default_network(spec)
    if network not in catalog.networks or network == "nvlink":
        names = [n for n in catalog.networks if n != "nvlink"]
        raise UserError(f"unknown network {network!r}; choose one of: {', '.join(names)}")
    if n_gpus <= 0 or n_gpus % spec.gpus_per_node:
        raise UserError(
            f"--gpus {n_gpus} is not a positive multiple of the {gpu} node size ({spec.gpus_per_node}); "
            f"use e.g. {max(1, math.ceil(max(n_gpus, 1) / spec.gpus_per_node)) * spec.gpus_per_node}"
        )
    d = catalog.defaults
    fields = dict(
        pue=d.get("pue", 1.2), usd_per_gpu_hour=spec.usd_per_gpu_hour,
        gpu_failures_per_day=d.get("gpu_failures_per_day", 4.7e-4), storage_write_gbps=d.get("storage_write_gbps", 2000.0),
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Cluster(gpu=spec, network=catalog.networks[network], nvlink=catalog.networks["nvlink"], n_gpus=n_gpus, **fields)
