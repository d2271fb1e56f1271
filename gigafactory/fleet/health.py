"""Pre-flight health of the machines a job is about to run on: measure each accelerator, link, disk and host, then
judge every rank against the fleet's median (not a fixed number), and nodes by their worst rank.

Probes, each on every rank (under torchrun: torch.distributed, gloo on CPU and NCCL on GPUs):
- compute: dense matmul TFLOP/s (bf16 on GPUs, fp32 on CPU), against the catalog's peak where the GPU is known;
- memory: device copy bandwidth (GB/s);
- numerics: a seeded matmul + reduction hashed; every rank must get the same bytes, run after run;
- interconnect: all-reduce bus bandwidth and all-to-all bandwidth, over the ranks of each node and over all ranks;
- storage: write + fsync + read of a file in the given directory (MB/s);
- host: total and available memory; NVML's ECC and throttle counters on NVIDIA machines (absent NVML is reported).

A rank is bad when its numerics differ from the majority, a probe failed, NVML reports uncorrected ECC errors, or a
throughput metric is below `slow_ratio` x the fleet median of that metric (judged once at least three ranks, or
nodes for storage, measured it). A node is bad when any of its ranks is.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

THROUGHPUT = ("matmul_tflops", "memory_gbps", "storage_write_mbps", "storage_read_mbps")  # judged per rank
LINKS = ("allreduce_node_gbps", "allreduce_world_gbps", "alltoall_world_gbps")  # one collective's view: judged per node


MIN_TO_COMPARE = 3  # measurements of a metric needed before any is judged against their median


@dataclass
class ProbeSizes:
    """How big each probe is: small enough for a CPU test, large enough to be bandwidth-bound on a GPU."""

    matmul_n: int = 1024
    memory_mib: int = 256
    comm_mib: int = 16
    storage_mib: int = 64
    repeats: int = 3


def _best_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def probe_compute(device: torch.device, sizes: ProbeSizes, sync, slow_factor: float = 1.0) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = sizes.matmul_n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = _best_time(lambda: a @ b, sizes.repeats, sync) * slow_factor
    src = torch.randn(sizes.memory_mib * 2**18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), sizes.repeats, sync)
    return {"matmul_tflops": 2 * n**3 / seconds / 1e12, "memory_gbps": 2 * src.numel() * 4 / copy_s / 1e9}


def numerics_digest(device: torch.device) -> str:
    """sha256 of a seeded computation; the same on every healthy rank of the same kind, every time."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    a = torch.randn(256, 256, generator=g).to(device)
    out = torch.tanh(a @ a.T).sum(dim=0).cpu().double().numpy().tobytes()
    return hashlib.sha256(out).hexdigest()[:16]


def probe_storage(directory: Path, sizes: ProbeSizes) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(2**20) * sizes.storage_mib
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".health-", delete=True) as f:
        start = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        f.seek(0)
        start = time.perf_counter()
        while f.read(2**24):
            pass
        read_s = time.perf_counter() - start
    mb = len(data) / 1e6
    return {"storage_write_mbps": mb / write_s, "storage_read_mbps": mb / max(read_s, 1e-9)}


def host_memory() -> dict:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return {"host_mem_total_gib": info.get("MemTotal", 0) / 2**30, "host_mem_available_gib": info.get("MemAvailable", 0) / 2**30}


def nvml_counters(local_rank: int) -> dict:
    """Uncorrected ECC errors and active throttle reasons from NVML, or why they are not available."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "not available (nvidia-ml-py not installed)"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(local_rank)
        ecc = pynvml.nvmlDeviceGetTotalEccErrors(handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        throttle = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
        return {"nvml": "ok", "ecc_uncorrected": int(ecc), "throttle_reasons": int(throttle)}
    except Exception as err:  # noqa: BLE001 - no driver, no GPU, or a counter the card lacks
        return {"nvml": f"not available ({str(err)[:80]})"}


def _bus_gbps(op, tensor: torch.Tensor, world: int, sizes: ProbeSizes, sync, factor: float) -> float:
    seconds = _best_time(op, sizes.repeats, sync)
    return factor * tensor.numel() * tensor.element_size() / seconds / 1e9 if world > 1 else 0.0


def probe_interconnect(device: torch.device, sizes: ProbeSizes, sync, node_group, node_size: int) -> dict:
    """All-reduce bus bandwidth (2(n-1)/n x bytes / time, as nccl-tests report it) within the node and over all
    ranks, and all-to-all over all ranks ((n-1)/n x bytes / time). Collective: every rank calls it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {}
    x = torch.ones(sizes.comm_mib * 2**18, device=device)
    out = torch.empty_like(x)
    result = {"allreduce_world_gbps": _bus_gbps(lambda: dist.all_reduce(x), x, world, sizes, sync, 2 * (world - 1) / world),
              "alltoall_world_gbps": _bus_gbps(lambda: dist.all_to_all_single(out, x), x, world, sizes, sync, (world - 1) / world)}
    if node_size > 1:
        result["allreduce_node_gbps"] = _bus_gbps(lambda: dist.all_reduce(x, group=node_group), x, node_size, sizes, sync,
                                                  2 * (node_size - 1) / node_size)
    return result


def judge(ranks: list[dict], slow_ratio: float) -> dict:
    """Verdicts for every rank and node from all ranks' measurements (rank 0 calls it with everyone's)."""
    medians = {}
    for key in THROUGHPUT:
        values = [r[key] for r in ranks if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if len(values) >= MIN_TO_COMPARE:  # with two, neither can be told to be the slow one
            medians[key] = statistics.median(values)
    digests = [r.get("numerics") for r in ranks]
    majority = max(set(digests), key=digests.count) if digests else None
    for r in ranks:
        reasons = list(r.get("errors", []))
        if r.get("numerics") != majority:
            reasons.append(f"numerics differ from the majority ({r.get('numerics')} vs {majority})")
        if not r.get("numerics_repeatable", True):
            reasons.append("numerics differ between two runs on this rank")
        if r.get("ecc_uncorrected", 0):
            reasons.append(f"{r['ecc_uncorrected']} uncorrected ECC errors")
        for key, median in medians.items():
            value = r.get(key)
            if isinstance(value, (int, float)) and value < slow_ratio * median:
                reasons.append(f"{key} {value:.3g} < {slow_ratio:g} x fleet median {median:.3g}")
        r["verdict"], r["reasons"] = ("bad" if reasons else "ok"), reasons
    nodes: dict[str, dict] = {}
    for r in ranks:
        node = nodes.setdefault(r["node"], {"ranks": [], "verdict": "ok", "reasons": []})
        node["ranks"].append(r["rank"])
        for key in LINKS:  # a node's link speed: the slowest its ranks saw
            if isinstance(r.get(key), (int, float)):
                node[key] = min(node.get(key, r[key]), r[key])
        if r["verdict"] == "bad":
            node["verdict"] = "bad"
            node["reasons"] += [f"rank {r['rank']}: {why}" for why in r["reasons"]]
    for key in LINKS:
        values = [n[key] for n in nodes.values() if key in n]
        if len(values) < MIN_TO_COMPARE:
            continue
        medians[key] = median = statistics.median(values)
        for n in nodes.values():
            if n.get(key, median) < slow_ratio * median:
                n["verdict"] = "bad"
                n["reasons"].append(f"{key} {n[key]:.3g} < {slow_ratio:g} x fleet median {median:.3g}")
    return {"fleet_median": medians, "ranks": ranks, "nodes": nodes,
            "bad_nodes": sorted(name for name, n in nodes.items() if n["verdict"] == "bad"), "slow_ratio": slow_ratio}


def _run_probe(out: dict, name: str, probe) -> None:
    try:
        out.update(probe())
    except Exception as err:  # noqa: BLE001 - a failing probe is a finding about this rank, not a crash
        out["errors"].append(f"{name} probe failed: {str(err)[:160]}")


def measure(device: torch.device, storage_dir: Path, sizes: ProbeSizes, node: str, slow_factor: float = 1.0) -> dict:
    """This rank's measurements (collective under torch.distributed: the interconnect probe runs on every rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out: dict = {"rank": rank, "node": node, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "errors": []}
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # On CPU the ranks of a node share its cores, so they measure compute one at a time; each GPU measures its own
    # at once. Storage is measured by one rank per node (they share its disk).
    turns = range(local_world) if device.type == "cpu" else [local_rank]
    for turn in turns:
        if turn == local_rank:
            _run_probe(out, "compute", lambda: probe_compute(device, sizes, sync, slow_factor))
            if local_rank == 0:
                _run_probe(out, "storage", lambda: probe_storage(storage_dir, sizes))
        if device.type == "cpu" and dist.is_initialized():
            dist.barrier()
    first, second = numerics_digest(device), numerics_digest(device)
    out.update(numerics=first, numerics_repeatable=first == second, **host_memory())
    out.update(nvml_counters(int(os.environ.get("LOCAL_RANK", "0"))) if device.type == "cuda" else {"nvml": "not applicable (CPU)"})
    nodes = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    groups = {}
    for name in sorted(set(nodes)):  # every rank creates every node's group, in the same order
        members = [r for r, n in enumerate(nodes) if n == name]
        groups[name] = (dist.new_group(members) if dist.is_initialized() and len(members) > 1 else None, len(members))
    group, size = groups[node]
    out.update(probe_interconnect(device, sizes, sync, group, size))
    return out
