"""Time of one collective over a group of ranks, on the links it actually crosses.

A group of `n` ranks spaced `stride` apart in the world mesh has k = min(n, domain // stride) members inside
one NVLink domain. With k == n it runs on NVLink alone; otherwise hierarchically: the intra-domain phase on
NVLink, then N = n/k domains exchange 1/k of the data each, every member over its own NIC (which is how NCCL
rings with one channel per NIC behave). Latency uses the better of ring ((n-1) steps) and tree (log2 n steps).
Sizes are bytes; `size` is the full (unsharded) buffer for all-reduce / all-gather / reduce-scatter and the
bytes one rank sends for all-to-all and point-to-point.
"""

from __future__ import annotations

import math

from gigafactory.plan.hardware import Cluster


def _split(n: int, stride: int, domain: int) -> tuple[int, int]:
    k = n if stride * n <= domain else max(1, min(n, domain // stride))
    return k, n // k


def _lat(steps_ring: int, n: int, alpha: float) -> float:
    return alpha * min(steps_ring, 2 * max(1, math.ceil(math.log2(max(n, 2)))))


def all_reduce(size: float, n: int, stride: int, cluster: Cluster) -> float:
    if n <= 1 or size <= 0:
        return 0.0
    k, nodes = _split(n, stride, cluster.gpu.nvlink_domain)
    nv, nic = cluster.nvlink_gbps * 1e9, cluster.nic_gbps * 1e9
    a_nv, a_net = cluster.nvlink.latency_us * 1e-6, cluster.net_latency_s()
    t = 2 * (k - 1) / k * size / nv + (_lat(2 * (k - 1), k, a_nv) if k > 1 else 0.0)
    if nodes > 1:
        t += 2 * (nodes - 1) / nodes * (size / k) / nic + _lat(2 * (nodes - 1), nodes, a_net)
    return t


def all_gather(size: float, n: int, stride: int, cluster: Cluster) -> float:
    """Also the time of a reduce-scatter of the same full size."""
    if n <= 1 or size <= 0:
        return 0.0
    k, nodes = _split(n, stride, cluster.gpu.nvlink_domain)
    nv, nic = cluster.nvlink_gbps * 1e9, cluster.nic_gbps * 1e9
    a_nv, a_net = cluster.nvlink.latency_us * 1e-6, cluster.net_latency_s()
    t = (k - 1) / k * size / nv + (_lat(k - 1, k, a_nv) if k > 1 else 0.0)
    if nodes > 1:
        t += (nodes - 1) / nodes * (size / k) / nic + _lat(nodes - 1, nodes, a_net)
    return t


reduce_scatter = all_gather


def p2p(size: float, stride: int, cluster: Cluster) -> float:
    """One send between neighbouring ranks `stride` apart (pipeline stages)."""
    if size <= 0:
        return 0.0
    if stride < cluster.gpu.nvlink_domain:
        return size / (cluster.nvlink_gbps * 1e9) + cluster.nvlink.latency_us * 1e-6
    return size / (cluster.nic_gbps * 1e9) + cluster.net_latency_s()


def moe_all_to_all(size: float, top_k: int, n: int, stride: int, cluster: Cluster, node_limit: int = 0) -> float:
    """Dispatch (or combine) of `size` bytes of tokens, each sent to `top_k` experts spread over n ranks.

    Copies for ranks in this NVLink domain go over NVLink; the rest cross the NIC. A plain all-to-all sends every
    remote copy; node-limited routing (DeepSeek-V3, at most `node_limit` nodes per token, one send per node,
    forwarded over NVLink on arrival) sends each token at most once to each of at most node_limit nodes."""
    if n <= 1 or size <= 0:
        return 0.0
    k, nodes = _split(n, stride, cluster.gpu.nvlink_domain)
    copies = size * top_k
    t = copies * (k - 1) / n / (cluster.nvlink_gbps * 1e9) + cluster.nvlink.latency_us * 1e-6
    if nodes > 1:
        if node_limit:
            distinct = nodes * (1 - (1 - 1 / nodes) ** top_k)  # expected nodes a token's experts lie on
            remote = size * min(node_limit, distinct) * (nodes - 1) / nodes
        else:
            remote = copies * (n - k) / n
        t += remote / (cluster.nic_gbps * 1e9) + cluster.net_latency_s()
    return t
