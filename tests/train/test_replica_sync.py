"""Fault tolerance's per-step gradient sync (ddp) keeps the loss on the device: it rides in the gradients' allreduce
and comes back a tensor, so the step still has one batched host read (train/host_reads.py)."""

from __future__ import annotations

import torch

from gigafactory.config.job import FaultToleranceConfig
from gigafactory.train.cross_site import SimulatedLink
from gigafactory.train.replica_groups import ReplicaGroupSync
from test_host_syncs import HostReads  # tests/train is on sys.path, as pytest imports its test modules


class _Done:
    def wait(self) -> None:
        pass


class TwoGroupManager:
    """torchft's Manager as seen by sync(): its allreduce averages in place with a peer group's flat buffer."""

    def __init__(self, peer: torch.Tensor):
        self.peer, self.sent = peer, None

    def allreduce(self, flat: torch.Tensor) -> _Done:
        self.sent = flat.clone()
        flat.add_(self.peer).div_(2)
        return _Done()

    def num_participants(self) -> int:
        return 2


def test_the_loss_rides_in_the_gradient_allreduce_and_stays_on_the_device():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    own_grads = torch.cat([p.grad for p in params])
    peer = torch.randn(9, generator=gen)
    loss = torch.tensor(2.718281828459045, dtype=torch.float64)  # reduce_loss's 0-dim float64 tensor

    sync = ReplicaGroupSync.__new__(ReplicaGroupSync)  # the sync alone: no lighthouse, no process group
    sync.manager, sync.link = TwoGroupManager(peer), SimulatedLink(FaultToleranceConfig())
    with HostReads() as counter:
        averaged = sync.sync(params, loss)
    assert counter.total() == 0, counter.reads

    assert isinstance(averaged, torch.Tensor) and averaged.shape == () and averaged.dtype == torch.float32
    # The loss travels as float32, bitwise what the host-side float(loss) -> float32 tensor path sent.
    assert torch.equal(sync.manager.sent[-1], torch.tensor(float(loss), dtype=torch.float32))
    assert float(averaged) == float((torch.tensor(float(loss), dtype=torch.float32) + peer[-1]) / 2)
    assert torch.equal(torch.cat([p.grad for p in params]), (own_grads + peer[:-1]) / 2)
    assert sync.link.transfers == 1 and sync.link.bytes_sent == 9 * 4  # one ring allreduce of 9 float32s, 2 groups
