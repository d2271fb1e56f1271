"""Cross-site synchronisation of replica groups every H inner steps (LocalSGD, DiLoCo) on torchft, and a simulated
slow link between sites.

The outer step is torchft's own DiLoCo (torchft/local_sgd.py): its fragment keeps a backup of the weights at the
last sync, computes the pseudo-gradient (backup - local weights), averages it over the quorum with
`Manager.allreduce`, votes with `Manager.should_commit`, and on a commit applies the outer optimizer (SGD with
Nesterov momentum) from the backup; on a failed vote it restores the backup. It takes FSDP DTensors (it works on
each rank's local shard; rank r of every group holds the same shard). We drive that fragment from the trainer's step
counter instead of torchft's optimizer hooks, because a guard's skip leaves the optimizer hook uncalled in one group
only, which would move that group's sync schedule. LocalSGD (average the weights) is torchft's `LocalSGD` sync
(allreduce of the weights themselves, then should_commit), driven the same way; on a failed vote torchft keeps the
unsynced local weights, so we restore the weights of the last sync ourselves: the interval is re-run
(replica_groups.py) and must not be trained twice. DiLoCo with outer lr 1 and no momentum is the same update as
LocalSGD through a different computation (backup - 1 * mean(backup - local)); the H=1 test checks they agree.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.tensor import DTensor

from gigafactory.config.job import FaultToleranceConfig


class SimulatedLink:
    """A slow cross-site link: each cross-group transfer waits latency + bytes / bandwidth (a sleep after the real,
    local allreduce). A ring allreduce of B bytes over G sites sends 2 (G-1)/G * B per site; that is what is timed."""

    def __init__(self, cfg: FaultToleranceConfig):
        self.latency_s, self.gbps, self.groups = cfg.link_delay_ms / 1e3, cfg.link_gbps, cfg.replica_groups
        self.bytes_sent = 0  # by this rank over the run, ring-allreduce volume
        self.transfers = 0
        self.delay_s = 0.0

    def wire_bytes(self, payload_bytes: int, participants: int) -> int:
        return int(2 * (participants - 1) / participants * payload_bytes) if participants > 1 else 0

    def transfer(self, payload_bytes: int, participants: int) -> None:
        """Account for (and, if a link is simulated, wait for) one allreduce of `payload_bytes` over the quorum."""
        wire = self.wire_bytes(payload_bytes, participants)
        self.bytes_sent += wire
        self.transfers += 1
        if wire and (self.latency_s or self.gbps):
            delay = self.latency_s + (wire * 8 / (self.gbps * 1e9) if self.gbps else 0.0)
            self.delay_s += delay
            time.sleep(delay)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


class OuterSync:
    """torchft's LocalSGD or DiLoCo (one fragment: the whole model), synced by the trainer every `sync_every` steps."""

    def __init__(self, cfg: FaultToleranceConfig, manager, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer):
        from torchft.local_sgd import DiLoCo, LocalSGD

        self.manager, self.model = manager, model
        self.params = [p for p in model.parameters()]
        self.payload_bytes = sum(_local(p).numel() * p.element_size() for p in self.params)
        if cfg.sync == "localsgd":  # not entered as a context: no optimizer hooks (see the module docstring)
            self.local_sgd, self.fragment = LocalSGD(manager, model, inner_optimizer, cfg.sync_every), None
            self.backup: list[torch.Tensor] = []
            return
        nesterov = cfg.outer_nesterov and cfg.outer_momentum > 0
        self.outer_optimizer = torch.optim.SGD(self.params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=nesterov)
        # Registers the backup weights and the outer optimizer with the manager: a healing group receives both.
        self.diloco = DiLoCo(manager, [model], inner_optimizer, self.outer_optimizer, sync_every=cfg.sync_every)
        self.fragment = self.diloco._fragments[0]

    @torch.no_grad()
    def begin_interval(self) -> None:
        """The weights now are the global ones (after a sync, a heal or a resume): what the next sync starts from."""
        if self.fragment is not None:
            self.fragment.save_parameters()
        else:
            self.backup = [_local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def sync(self, link: SimulatedLink, participants: int) -> bool:
        """Average over the quorum (diloco: the pseudo-gradients, then the outer step; localsgd: the weights); False,
        with the weights back at the last sync, when the vote fails (e.g. a peer group died during the interval)."""
        if self.fragment is not None:
            self.fragment.prepare_sync()
            link.transfer(self.payload_bytes, participants)
            return self.fragment.perform_sync()
        commits = self.manager.current_step()
        link.transfer(self.payload_bytes, participants)
        self.local_sgd._perform_sync()  # allreduce of the weights, should_commit, copy back on a commit
        if self.manager.current_step() > commits:
            return True
        for p, saved in zip(self.params, self.backup):
            _local(p).copy_(saved)
        return False
