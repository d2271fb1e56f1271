"""Replica-group fault tolerance (torchft) in the multi-node launchers: what Slurm and Kubernetes must agree on.

With `fault_tolerance.enabled`, a job of N nodes is `fault_tolerance.replica_groups` = G independent torchrun jobs of
N / G nodes each (the parallel layout is checked against one group), plus one torchft lighthouse that forms the
per-step quorum of the live groups. Each group has its own rendezvous (port + g, id `<job>-group<g>`) and its own
restart budget, so a failure stays inside its group: the others keep stepping and the restarted group heals from a
live peer (gigafactory/train/replica_groups.py). Every group's workers get `--fault_tolerance.replica_id=g` and the
lighthouse address, as `gigafactory train --nproc` does locally (gigafactory/cli/local_launch.py).

A `fault_tolerance.lighthouse` already set (config or flags) names a lighthouse the site runs itself: no lighthouse
is started and every group is pointed at that one.
"""

from __future__ import annotations

import re

from gigafactory.config.job import FaultToleranceConfig
from gigafactory.errors import UserError

LIGHTHOUSE_PORT = 29510  # torchft_lighthouse's own default (--bind [::]:29510)
LIGHTHOUSE_BIN = "torchft_lighthouse"  # installed by the torchft wheel next to python
_ADDRESS_RE = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?")


def lighthouse_command(ft: FaultToleranceConfig, port: int) -> list[str]:
    """The lighthouse's command line, with the same knobs `train --nproc` gives it. Bound to every IPv4 address:
    torchft's default `[::]` fails on hosts with IPv6 disabled."""
    return [LIGHTHOUSE_BIN, "--bind", f"0.0.0.0:{port}", "--min_replicas", str(ft.min_replicas),
            "--join_timeout_ms", str(ft.join_timeout_ms), "--heartbeat_timeout_ms", str(ft.heartbeat_timeout_ms)]


def group_flags(group: int | str, lighthouse: str) -> list[str]:
    """What makes a torchrun job replica group `group`: appended last, after the user's flags."""
    return [f"--fault_tolerance.replica_id={group}", f"--fault_tolerance.lighthouse={lighthouse}"]


def check_fault_tolerance(ft: FaultToleranceConfig, *, nodes: int, port: int, lighthouse_port: int, train_args: list[str]) -> int:
    """Validate a fault-tolerant launch; returns the nodes per replica group. One-line UserError otherwise."""
    groups = ft.replica_groups
    if nodes % groups:
        raise UserError(f"--nodes {nodes} does not split into fault_tolerance.replica_groups={groups} equal groups; "
                        f"use a multiple of {groups} nodes (each group is its own torchrun job on whole nodes)")
    for arg in train_args:
        if arg.split("=", 1)[0] == "--fault_tolerance.replica_id":
            raise UserError("--fault_tolerance.replica_id after `--`: the launcher gives every replica group its own; remove it")
    if port + groups - 1 > 65535:
        raise UserError(f"--port {port}: the {groups} replica groups rendezvous on ports {port}..{port + groups - 1}, past 65535; pick a lower --port")
    if not 1 <= lighthouse_port <= 65535:
        raise UserError(f"--lighthouse-port {lighthouse_port} must be a TCP port (1-65535)")
    if port <= lighthouse_port < port + groups and not ft.lighthouse:
        raise UserError(f"--lighthouse-port {lighthouse_port} collides with the replica groups' rendezvous ports "
                        f"{port}..{port + groups - 1}; pick another --lighthouse-port or --port")
    if ft.lighthouse and not _ADDRESS_RE.fullmatch(ft.lighthouse):
        raise UserError(f"fault_tolerance.lighthouse {ft.lighthouse!r} must be http://HOST:PORT (an address every node can reach)")
    return nodes // groups
