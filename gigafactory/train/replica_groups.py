"""Replica-group fault tolerance on torchft: the trainer's side of torchft's per-step protocol.

Each replica group is one torchrun job with any layout inside (FSDP/TP/EP/PP over its own process group). Rank r of
every group joins a torchft ProcessGroup with rank r of the other groups; torchft's Manager forms a quorum of the
live groups each step (through the lighthouse), averages the gradients over it, and votes whether the step
commits. A group that fails leaves the quorum at the next step; when it comes back it receives model, optimizer,
anomaly-detector state, step and data position from a live peer (torchft's checkpoint transport), not from disk.

Data: the global batch of a step is `replica_groups` group batches; the participants of a step take the next
`num_participants` group batches of one global sample order (group batch index = torchft's `batches_committed` +
the group's rank in the quorum), so a step with fewer groups trains on fewer samples and none is skipped or
repeated. With every group alive the order equals a run with dp = replica_groups x the group's data ranks.

Sync modes (`fault_tolerance.sync`): ddp averages the gradients every step, as above. localsgd/diloco (cross-site,
train/cross_site.py) run the same protocol once per interval of H = sync_every steps (streaming_diloco: H/F steps,
each interval syncing one of the F fragments): the quorum (and a heal) at the
interval's start, H inner steps with no cross-group traffic, then the pseudo-gradients are averaged and voted on at
its end. The data unit is then a chunk of H consecutive group batches: inner step k of an interval trains group
batch (chunks committed + rank in the quorum) * H + k, and a commit adds the participants' chunks. A failed vote (a
peer died during the interval) drops the whole interval in every group (weights back at the last sync) and it is
re-run with the next quorum, so every group batch is still trained once in the committed weights.
"""

from __future__ import annotations

import logging
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from gigafactory.config.job import FaultToleranceConfig
from gigafactory.errors import UserError
from gigafactory.resilience.events import EventLog
from gigafactory.train.checkpoint import attach_extra_state
from gigafactory.train.cross_site import OuterSync, SimulatedLink


def _local_copy(value):
    """A copy of a state dict with every DTensor replaced by this rank's shard (rank r of every group holds the same
    shard). A copy, not the live tensors: torchft's transport may still be sending it while this group trains on
    (under localsgd/diloco the next inner steps follow the quorum at once), and a healing peer must get the state of
    one moment, not weights updated half-way through the transfer."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _local_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local_copy(v) for v in value)
    return value


def _copy_into(template, received):
    """Fill `template` (a state dict as get_state_dict returns it, DTensors included) with the peer's shards."""
    if isinstance(template, dict):
        return {k: _copy_into(template[k], received[k]) if k in template else received[k] for k in received}
    if isinstance(template, DTensor):
        template.to_local().copy_(received)
        return template
    if isinstance(template, torch.Tensor):
        return template.copy_(received) if template.shape == received.shape else received.clone()
    return received


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class _AcceleratorOnlyNotes(logging.Filter):
    """Drop torchft's per-quorum note that the NCCL flight recorder cannot be reset (always true on CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "flight recorder" not in record.getMessage()


class ReplicaGroupSync:
    """One rank's torchft Manager plus what the trainer needs around it (data index, gradient sync, heal)."""

    def __init__(self, cfg: FaultToleranceConfig, trainer, events: EventLog):
        try:
            import torchft
        except ImportError:
            raise UserError("fault_tolerance.enabled needs torchft: pip install 'gigafactory[ft]' (torchft==0.2.0)") from None

        if not cfg.lighthouse:
            raise UserError("fault_tolerance.enabled needs fault_tolerance.lighthouse=http://HOST:PORT (a running torchft "
                            "lighthouse); `gigafactory train --nproc N` starts one")
        self.cfg, self.trainer, self.events = cfg, trainer, events
        logging.getLogger("torchft.manager").addFilter(_AcceleratorOnlyNotes())
        # torchft deserialises a peer's state from a read-only buffer and copies it into the model at once
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        self.healed: dict | None = None  # set by the peer-state callback during a quorum
        self.membership: tuple[int, int] | None = None
        store_host, store_port = self._group_store(trainer.rank)
        device = trainer.device.type
        pg = torchft.ProcessGroupNCCL(timeout=timedelta(seconds=cfg.timeout_s)) if device == "cuda" else \
            torchft.ProcessGroupGloo(timeout=timedelta(seconds=cfg.timeout_s))
        try:
            self.manager = self._manager(torchft, pg, store_host, store_port)
        except Exception as err:  # noqa: BLE001 - torchft raises plain RuntimeErrors for unreachable servers
            raise UserError(f"cannot join the torchft lighthouse at {cfg.lighthouse} ({str(err).splitlines()[0][:160]}); "
                            "check fault_tolerance.lighthouse or start one (torchft_lighthouse --min_replicas 1)") from None
        self.per_step = cfg.sync == "ddp"
        # The protocol interval: 1 under ddp; under streaming_diloco one fragment syncs every sync_every/fragments.
        self.every = cfg.sync_every // (cfg.fragments if cfg.sync == "streaming_diloco" else 1)
        self.prepare_at = self.every - cfg.fragment_sync_delay  # streaming: start the fragment's allreduce early
        self.link = SimulatedLink(cfg)
        self.outer = None if self.per_step else OuterSync(cfg, self.manager, trainer.model, trainer.optimizer)
        if self.outer is not None and self.outer.fragments:  # outer momentum (and streaming backups) go to disk too
            attach_extra_state(trainer.optimizer, self.outer)
        self.interval_start = 0  # the trainer step the current interval started from
        if not self.per_step:
            c = trainer.cfg.checkpoint
            for key, every in (("checkpoint.every", c.every), ("checkpoint.memory_every", c.memory_every)):
                if every % self.every:  # a checkpoint between syncs would hold one group's unsynced weights
                    raise UserError(f"{key}={every} must be a multiple of fault_tolerance.sync_every={self.every} "
                                    f"(checkpoints are taken at syncs under fault_tolerance.sync={cfg.sync})")

    def _manager(self, torchft, pg, store_host: str, store_port: int):
        cfg, trainer = self.cfg, self.trainer
        return torchft.Manager(
            pg=pg, load_state_dict=self._load_peer_state, state_dict=self._peer_state, min_replica_size=cfg.min_replicas,
            use_async_quorum=False,  # heal before the forward pass, so a rejoining group trains in the step it joins
            timeout=timedelta(seconds=cfg.timeout_s), quorum_timeout=timedelta(seconds=cfg.quorum_timeout_s),
            connect_timeout=timedelta(seconds=cfg.timeout_s),
            rank=trainer.rank, world_size=trainer.world_size, store_addr=store_host, store_port=store_port,
            lighthouse_addr=cfg.lighthouse, replica_id=f"group{cfg.replica_id}",
            init_sync=False,  # every group initialises identically from training.seed
            quorum_retries=3,  # ride out a restart of the lighthouse
        )

    @staticmethod
    def _group_store(rank: int) -> tuple[str, int]:
        """A fresh TCPStore for this attempt of the group (torchrun's agent store keeps a dead attempt's keys)."""
        import os

        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = [0]
        if rank == 0:
            store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            ReplicaGroupSync._store = store  # keep the server alive for the process's life
            port = [store.port]
        if dist.is_initialized():
            dist.broadcast_object_list(port, src=0)
        return host, int(port[0])

    # ---- peer state transfer -----------------------------------------------------------------------------------
    def _peer_state(self) -> dict:
        t = self.trainer
        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        return {"model": _local_copy(model_sd), "optim": _local_copy(optim_sd), "guard": t.guard.state_dict(), "step": t.step}

    def _load_peer_state(self, state: dict) -> None:
        started = time.perf_counter()
        t = self.trainer
        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        set_state_dict(t.model, t.optimizer, model_state_dict=_copy_into(model_sd, state["model"]),
                       optim_state_dict=_copy_into(optim_sd, state["optim"]))
        t.guard.load_state_dict(state["guard"])
        from_step, t.step = t.step, int(state["step"])
        self.healed = {"from_step": from_step, "to_step": t.step, "bytes": _nbytes(state["model"]) + _nbytes(state["optim"]),
                       "load_s": round(time.perf_counter() - started, 4)}

    # ---- the per-step protocol ---------------------------------------------------------------------------------
    def start_step(self, first: bool = False) -> bool:
        """Join this step's quorum, healing from a peer first if this group is behind; True if it healed.

        `first`: this process's first step. Unless it healed (peers are running), the job is starting: wait, up to
        quorum_timeout_s, until every replica group is in the quorum, so that a run's first steps do not depend on
        which group's processes happened to start first (votes not to commit while waiting)."""
        self.healed = None
        started = time.perf_counter()
        deadline = time.monotonic() + self.cfg.quorum_timeout_s
        while True:
            self.manager.start_quorum()
            n = self.manager.num_participants()
            waiting = first and self.healed is None and n < self.cfg.replica_groups and self.manager.errored() is None
            if not waiting or time.monotonic() > deadline:
                break
            self.manager.report_error(RuntimeError(f"waiting for all {self.cfg.replica_groups} replica groups to start ({n} in the quorum)"))
            self.manager.should_commit()
            time.sleep(0.2)
        quorum_s = time.perf_counter() - started
        if self.manager.errored() is not None:
            return False
        rank = self.manager.participating_rank()
        if self.healed is not None:
            self.events.record("ft_heal", once=True, group=self.cfg.replica_id, step=self.step, quorum_s=round(quorum_s, 4), **self.healed)
        if (rank, n) != self.membership:
            self.membership = (rank, n)
            self.events.record("ft_quorum", once=True, group=self.cfg.replica_id, step=self.step + 1, participants=n, participating_rank=rank,
                               replica_groups=self.cfg.replica_groups)
        return self.healed is not None

    def starts_interval(self, step: int) -> bool:
        """Whether the step after trainer step `step` begins a new quorum: every step under ddp, else every H."""
        return step % self.every == 0

    def begin_interval(self) -> None:
        """After this interval's quorum (and heal or resume): the weights now are the global ones."""
        self.interval_start = self.trainer.step
        if self.outer is not None:
            self.outer.begin_interval()

    def group_batch(self) -> int:
        """The index (in group batches, over the whole run) of the batch this group trains on in this step."""
        rank = self.manager.participating_rank() if self.manager.errored() is None else None
        return (self.manager.batches_committed() + (rank or 0)) * self.every + (self.trainer.step - self.interval_start)

    def batches_committed(self) -> int:
        """Group batches committed by every group so far (torchft counts chunks of sync_every group batches)."""
        return self.manager.batches_committed() * self.every

    def end_step(self, step: int, last_step: int) -> bool:
        """localsgd/diloco: at the end of an interval (or of the run), the outer sync; False if its vote failed."""
        if self.outer is None:
            return True
        if step % self.every and step != last_step:
            if step - self.interval_start == self.prepare_at and self.outer.fragments:
                self.outer.prepare()  # fragment_sync_delay > 0: the allreduce overlaps the interval's last steps
            return True
        committed = self.outer.sync(self.link, self.manager.num_participants())
        if not committed:
            self.events.record("ft_sync_failed", once=True, group=self.cfg.replica_id, step=step, interval_start=self.interval_start)
        return committed

    def sync(self, params, loss: torch.Tensor) -> torch.Tensor:
        """ddp: average the gradients and the loss (a 0-dim device tensor) over the groups of the quorum in one
        allreduce; returns the averaged loss as a 0-dim float32 device tensor, left for the step's one batched host
        read (train/host_reads.py). The loss travels in float32, the gradients' dtype here."""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        loss_1 = loss.detach().reshape(1).to(device=grads[0].device, dtype=torch.float32)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss_1])
        self.manager.allreduce(flat).wait()
        self.link.transfer(flat.numel() * flat.element_size(), self.manager.num_participants())
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]

    def errored(self) -> bool:
        return self.manager.errored() is not None

    def should_commit(self) -> bool:
        return self.manager.should_commit()

    def set_position(self, step: int, batches_committed: int) -> None:
        """After a disk resume: the step and the global data position (in group batches) torchft counts from."""
        self.manager.load_state_dict({"step": step // self.every, "batches_committed": batches_committed // self.every})

    @property
    def step(self) -> int:
        """The trainer step of the newest commit (torchft counts commits: one per step, or one per interval)."""
        return self.manager.current_step() * self.every

    def shutdown(self) -> None:
        """Leave the quorum; record what this rank sent across groups (ring-allreduce bytes) and the link's waits."""
        l = self.link
        self.events.record("ft_link", once=True, group=self.cfg.replica_id, sync=self.cfg.sync, sync_every=self.every,
                           bytes_sent=l.bytes_sent, transfers=l.transfers, link_wait_s=round(l.delay_s, 3))
        self.manager.shutdown(wait=False)
