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

Streaming DiLoCo is the same torchft class with the model split into F fragments (slices of consecutive layers,
`split_model`): the trainer's protocol interval becomes H/F steps and at the end of each one fragment (torchft's
choice: commits so far mod F) is synced, so each fragment still syncs every H steps while a sync sends ~1/F of the
model. A failed vote puts every weight back where the sub-interval started (torchft restores only the fragment).
Compression: torchft's `should_quantize` (fp8 allreduce) is a triton kernel on CUDA and silently sends full precision
without triton, so fp8 is refused there; bf16 is done here, by handing torchft's fragments a manager whose allreduce
casts the pseudo-gradient to bf16 and back (`_WireManager`), which also counts the bytes each sync sends.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.tensor import DTensor

from gigafactory.config.job import FaultToleranceConfig
from gigafactory.errors import UserError


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

    def transfer(self, payload_bytes: int, participants: int, started: float | None = None) -> None:
        """Account for (and, if a link is simulated, wait for) one allreduce of `payload_bytes` over the quorum.
        `started` (time.monotonic()): the transfer was started then and overlapped training; wait only for the rest."""
        wire = self.wire_bytes(payload_bytes, participants)
        self.bytes_sent += wire
        self.transfers += 1
        if wire and (self.latency_s or self.gbps):
            delay = self.latency_s + (wire * 8 / (self.gbps * 1e9) if self.gbps else 0.0)
            if started is not None:
                delay = max(0.0, delay - (time.monotonic() - started))
            self.delay_s += delay
            time.sleep(delay)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def split_model(model: torch.nn.Module, fragments: int) -> list[torch.nn.Module]:
    """The model as `fragments` containers of consecutive units (embedding, each layer, final norm and head) holding
    about equal parameter counts; every parameter is in exactly one fragment."""
    units: list[torch.nn.Module] = []
    for child in model.children():
        units.extend(child.values() if isinstance(child, torch.nn.ModuleDict) else child if isinstance(child, torch.nn.ModuleList) else [child])
    units = [u for u in units if any(True for _ in u.parameters())]
    if fragments == 1 or len(units) < fragments:
        if fragments > 1:
            raise UserError(f"fault_tolerance.fragments={fragments} is more than the model's {len(units)} slices (embedding, layers, head)")
        return [model]
    sizes = [sum(_local(p).numel() for p in u.parameters()) for u in units]
    total, parts, done = sum(sizes), [[] for _ in range(fragments)], 0
    for i, (unit, size) in enumerate(zip(units, sizes)):
        k = min(int(done * fragments / total), fragments - 1)
        k = max(k, fragments - (len(units) - i))  # leave one unit for each remaining fragment
        k = min(k, sum(1 for part in parts if part))  # contiguous: at most the next empty fragment
        parts[k].append(unit)
        done += size
    covered = {id(p) for part in parts for u in part for p in u.parameters()}
    if covered != {id(p) for p in model.parameters()}:
        raise UserError("fault_tolerance.fragments>1 needs a model whose parameters all sit in its embedding, layers, norm and head")
    return [torch.nn.ModuleList(part) for part in parts]


class _CastBack:
    """torchft Work of a bf16 allreduce: on wait, the averaged bf16 values are copied into the fp32 pseudo-gradient."""

    def __init__(self, work, wire: torch.Tensor, target: torch.Tensor):
        self.work, self.wire, self.target = work, wire, target

    def wait(self, timeout=None) -> bool:
        self.work.wait()
        self.target.copy_(self.wire)
        return True


class _WireManager:
    """torchft's Manager as the DiLoCo fragments see it: allreduces go out in the configured wire format, and their
    payload bytes are added up for the link (`take_bytes`); everything else is the manager's."""

    def __init__(self, manager, compression: str):
        self._manager, self._compression, self._bytes = manager, compression, 0

    def __getattr__(self, name: str):
        return getattr(self._manager, name)

    def allreduce(self, tensor: torch.Tensor, should_quantize: bool = False, **kwargs):
        if self._compression == "bf16" and tensor.dtype != torch.bfloat16:
            wire = tensor.to(torch.bfloat16)
            self._bytes += wire.numel() * wire.element_size()
            return _CastBack(self._manager.allreduce(wire, **kwargs), wire, tensor)
        quantize = self._compression == "fp8"
        self._bytes += tensor.numel() * (1 if quantize else tensor.element_size())  # fp8: one byte a value (+ row scales)
        return self._manager.allreduce(tensor, should_quantize=quantize, **kwargs)

    def take_bytes(self) -> int:
        sent, self._bytes = self._bytes, 0
        return sent


def _check_compression(compression: str) -> None:
    if compression != "fp8":
        return
    from torchft.manager import IS_TRITON_AVAILABLE

    if not (torch.cuda.is_available() and IS_TRITON_AVAILABLE):
        raise UserError("fault_tolerance.compression=fp8 is torchft's quantized allreduce, a triton kernel on CUDA: it needs a GPU and "
                        "`pip install triton` (without them torchft would send full precision); use compression=bf16 here")


class OuterSync:
    """torchft's LocalSGD or (Streaming) DiLoCo, synced by the trainer at the end of every protocol interval
    (sync_every steps; sync_every/fragments under streaming_diloco)."""

    def __init__(self, cfg: FaultToleranceConfig, manager, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer):
        from torchft.local_sgd import DiLoCo, LocalSGD

        self.manager, self.model = manager, model
        self.params = [p for p in model.parameters()]
        self.payload_bytes = sum(_local(p).numel() * p.element_size() for p in self.params)
        self.snapshot: list[torch.Tensor] = []  # localsgd, streaming: the weights at the interval's start
        if cfg.sync == "localsgd":  # not entered as a context: no optimizer hooks (see the module docstring)
            self.local_sgd, self.fragments = LocalSGD(manager, model, inner_optimizer, cfg.sync_every), []
            return
        _check_compression(cfg.compression)
        self.wire = _WireManager(manager, cfg.compression)
        streaming = cfg.sync == "streaming_diloco"
        slices = split_model(model, cfg.fragments if streaming else 1)
        nesterov = cfg.outer_nesterov and cfg.outer_momentum > 0
        # One outer optimizer per fragment: a fragment's outer step must not touch the others' (inner) gradients.
        self.outer_optimizers = [torch.optim.SGD(list(s.parameters()), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=nesterov)
                                 for s in slices]
        # Registers each fragment's backup weights and outer optimizer with the manager: a healing group receives them.
        self.diloco = DiLoCo(self.wire, slices, inner_optimizer, self.outer_optimizers, sync_every=cfg.sync_every,
                             fragment_sync_delay=cfg.fragment_sync_delay, fragment_update_alpha=cfg.fragment_update_alpha)
        self.fragments = self.diloco._fragments
        self.streaming = streaming
        self.prepared: tuple[int, float] | None = None  # (fragment, time.monotonic()) of an allreduce in flight

    def current_fragment(self) -> int:
        """The fragment the next sync sends (torchft's choice, the same in every group: commits so far mod F)."""
        return self.manager.current_step() % len(self.fragments)

    @torch.no_grad()
    def begin_interval(self) -> None:
        """The weights now are where the next sync starts from (after a sync, a heal or a resume). diloco: they are
        the global ones, the backup. streaming: each fragment's backup is its own last sync's; keep a snapshot of
        the weights so that a failed vote can drop just this sub-interval."""
        if self.fragments and not self.streaming:
            self.fragments[0].save_parameters()
        else:
            self.snapshot = [_local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def prepare(self) -> None:
        """Start the pseudo-gradient allreduce of this interval's fragment (it then overlaps the remaining steps)."""
        if self.prepared is None:
            k = self.current_fragment()
            self.fragments[k].prepare_sync()
            self.prepared = (k, time.monotonic())

    @torch.no_grad()
    def sync(self, link: SimulatedLink, participants: int) -> bool:
        """Average over the quorum (diloco: the pseudo-gradients, then the outer step; localsgd: the weights); False,
        with the weights back at the interval's start, when the vote fails (e.g. a peer group died during it)."""
        if not self.fragments:
            return self._sync_local_sgd(link, participants)
        started = self.prepared[1] if self.prepared is not None else None
        self.prepare()
        k, self.prepared = self.prepared[0], None
        link.transfer(self.wire.take_bytes(), participants, started)
        if self.fragments[k].perform_sync():
            return True
        if self.streaming:  # torchft put fragment k back at its backup; the other fragments trained this interval too
            self._restore_snapshot()
        return False

    def _sync_local_sgd(self, link: SimulatedLink, participants: int) -> bool:
        commits = self.manager.current_step()
        link.transfer(self.payload_bytes, participants)
        self.local_sgd._perform_sync()  # allreduce of the weights, should_commit, copy back on a commit
        if self.manager.current_step() > commits:
            return True
        self._restore_snapshot()
        return False

    def _restore_snapshot(self) -> None:
        for p, saved in zip(self.params, self.snapshot):
            _local(p).copy_(saved)

    # ---- disk checkpoints (train/checkpoint.py saves this next to the inner optimizer) ------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a disk checkpoint must hold besides the model and the inner optimizer for a resume to continue as if
        uninterrupted: each fragment's outer momentum and, under streaming, its backup (the global weights of its
        last sync; under diloco a checkpoint is taken at a sync, where the backup is the weights themselves)."""
        state: dict[str, torch.Tensor] = {}
        for k, (fragment, outer) in enumerate(zip(self.fragments, self.outer_optimizers)):
            if outer.defaults["momentum"] > 0:
                for i, p in enumerate(outer.param_groups[0]["params"]):
                    buf = outer.state.get(p, {}).get("momentum_buffer")  # none before the first outer step: zeros act alike
                    state[f"f{k}.momentum.{i}"] = buf.detach().clone() if buf is not None else torch.zeros_like(p)
            if self.streaming:
                for name, p in fragment._model_fragment.named_parameters():
                    backup = fragment.original_parameters[name].to(_local(p).device, copy=True)
                    state[f"f{k}.backup.{name}"] = DTensor.from_local(backup, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                        if isinstance(p, DTensor) else backup
        return state

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, (fragment, outer) in enumerate(zip(self.fragments, self.outer_optimizers)):
            if outer.defaults["momentum"] > 0:
                for i, p in enumerate(outer.param_groups[0]["params"]):
                    outer.state[p]["momentum_buffer"] = state[f"f{k}.momentum.{i}"].detach().clone()
            if self.streaming:
                for name in fragment.original_parameters:
                    fragment.original_parameters[name].copy_(_local(state[f"f{k}.backup.{name}"]))
