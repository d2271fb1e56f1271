"""How the job recovers from a failure: restart the whole job, or drop and re-admit one replica group (torchft).

`RecoverySpec` holds the knobs; the functions below price one failure from them, and are the same formulas the
event simulation and the analytic expectation use, so a drill can be compared with `rejoin_breakdown()` directly.
Defaults come from `ft_defaults.py` (one line each, with their sources).
"""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.errors import UserError
from gigafactory.simulate import ft_defaults as D

MODES = ("job-restart", "replica")


@dataclass
class RecoverySpec:
    """Recovery mechanism and the costs of replica-group recovery (torchft)."""

    recovery: str = knob(
        "job-restart",
        "job-restart: every job-killing failure restarts the whole job (torchrun today); replica: a failure drops only "
        "the failed node's replica group, the others keep stepping, the group rejoins from a live peer (torchft).",
        choices=MODES,
    )
    replica_group_gpus: int = knob(
        D.REPLICA_GROUP_GPUS,
        "GPUs per replica group (= tp x pp x cp x dp_shard of the layout; world / dp_replicate). Groups = nodes // "
        "nodes per group; node n belongs to group n x groups // nodes.",
    )
    min_replicas: int = knob(1, "Live groups torchft needs to keep stepping (Manager min_replica_size); fewer = job restart.")
    ft_detect_s: float = knob(D.DETECT_S, "Survivors' time to drop a crashed peer group (failed collective / heartbeat).")
    ft_timeout_s: float = knob(D.TIMEOUT_S, "Survivors' time to drop a hung peer group (torchft Manager timeout); classes with hangs=true.")
    quorum_s: float = knob(D.QUORUM_S, "One quorum change + process-group reconfigure, paid by the survivors when a group leaves and again when it joins.")
    group_restart_s: float = knob(D.GROUP_RESTART_S, "A failed group's restart on its (spare) nodes: process start, model build, init.")
    peer_gbps_per_gpu: float = knob(D.PEER_GBPS_PER_GPU, "GB/s each GPU of a rejoining group receives its shard at from its live counterpart.")
    transfer_overhead_s: float = knob(D.TRANSFER_OVERHEAD_S, "Fixed cost of one peer state transfer (connect, metadata, serialisation).")
    sync_every: int = knob(1, "Inner steps between cross-group syncs (DiLoCo/LocalSGD H; 1 = per-step sync): a group failure drops the interval in flight, up to H steps, in the survivors too.")
    groups_per_site: int = knob(1, "Replica groups per site (groups are numbered site by site); a site outage takes all of a site's groups out at once.")
    site_outages_per_year: float = knob(0.0, "Outages per site per year (grid, cooling, a cut link): the site's groups fail as a unit while the other sites keep stepping (replica recovery only); 0 = none.")
    site_repair_h: float = knob(24.0, "Hours a site stays down after an outage; its groups then restart (group_restart_s) and rejoin from a live peer.")
    params: float = knob(D.PARAMS, "Model parameters; one group's state = params x state_bytes_per_param.")
    state_bytes_per_param: float = knob(float(D.STATE_BYTES_PER_PARAM), "Bytes of training state per parameter (weights + master + optimizer).")

    def validate(self, gpus: int, gpus_per_node: int) -> None:
        if self.recovery not in MODES:
            raise UserError(f"recovery={self.recovery!r} is not one of: {', '.join(MODES)}")
        for name in ("ft_detect_s", "ft_timeout_s", "quorum_s", "group_restart_s", "transfer_overhead_s", "params", "state_bytes_per_param"):
            _finite_non_negative(name, getattr(self, name))
        if not (isinstance(self.peer_gbps_per_gpu, (int, float)) and 0 < self.peer_gbps_per_gpu < float("inf")):
            raise UserError(f"peer_gbps_per_gpu={self.peer_gbps_per_gpu!r} must be a finite number > 0")
        _finite_non_negative("site_outages_per_year", self.site_outages_per_year)
        _finite_non_negative("site_repair_h", self.site_repair_h)
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise UserError(f"sync_every={self.sync_every!r} must be an integer >= 1")
        if self.recovery != "replica":
            if self.site_outages_per_year > 0:
                raise UserError("site_outages_per_year needs recovery=replica (each site runs its own replica groups)")
            return
        g = self.replica_group_gpus
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % gpus_per_node or g > gpus:
            raise UserError(
                f"replica_group_gpus={g!r} must be a positive multiple of gpus_per_node={gpus_per_node} and at most gpus={gpus}"
            )
        m = self.min_replicas
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or m > self.groups(gpus, gpus_per_node):
            raise UserError(f"min_replicas={m!r} must be an integer in 1..{self.groups(gpus, gpus_per_node)} (the replica groups)")
        k, n = self.groups_per_site, self.groups(gpus, gpus_per_node)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or n % k:
            raise UserError(f"groups_per_site={k!r} must be a positive integer dividing the {n} replica groups")

    def groups(self, gpus: int, gpus_per_node: int) -> int:
        """Replica groups in the job (1 in job-restart mode: the whole job is one unit)."""
        if self.recovery != "replica":
            return 1
        return max(1, (gpus // gpus_per_node) // max(1, self.replica_group_gpus // gpus_per_node))

    # -- what one failure costs ---------------------------------------------------------------------------------------
    def state_bytes(self) -> float:
        """Bytes of one replica group's training state (each group holds a full replica, sharded over its GPUs)."""
        return self.params * self.state_bytes_per_param

    def transfer_s(self) -> float:
        """Peer transfer: every GPU of the joining group pulls its shard from its counterpart in parallel."""
        return self.state_bytes() / (self.replica_group_gpus * self.peer_gbps_per_gpu * 1e9) + self.transfer_overhead_s

    def survivor_stall_s(self, hangs: bool) -> float:
        """Survivors stop when a group fails: detection (crash or timeout) then one quorum change."""
        return (self.ft_timeout_s if hangs else self.ft_detect_s) + self.quorum_s

    def rejoin_stall_s(self) -> float:
        """Survivors stop when a group joins: one quorum change, during which a peer sends the state (torchft sends
        inside the quorum, before the step's allreduce)."""
        return self.quorum_s + self.transfer_s()

    def sites(self, gpus: int, gpus_per_node: int) -> int:
        return self.groups(gpus, gpus_per_node) // self.groups_per_site if self.recovery == "replica" else 1

    def site_availability(self) -> float:
        """Long-run fraction of time one site is up: it alternates up (exponential, mean 1 / rate) and down (repair)."""
        return 1.0 / (1.0 + self.site_outages_per_year / (365.0 * 24.0) * self.site_repair_h)

    def rejoin_breakdown(self, class_detect_s: float, step_time_s: float = 0.0) -> dict[str, float]:
        """From the failure to the group stepping again (spare available): the drill's kill-to-rejoin time. A restarted
        group joins at the survivors' next step boundary: half a step on average (`wait_s`)."""
        parts = {"detect_s": class_detect_s, "restart_s": self.group_restart_s, "wait_s": step_time_s / 2.0,
                 "transfer_s": self.transfer_s(), "quorum_s": self.quorum_s}
        return {**parts, "total_s": sum(parts.values()), "bytes": self.state_bytes()}


def _finite_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
        raise UserError(f"{name}={value!r} must be a finite number >= 0")
