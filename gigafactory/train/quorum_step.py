"""The trainer's side of a fault-tolerant step's edges: joining the quorum before it, dropping it when the quorum
fails during it. The protocol itself (torchft's Manager, heal, gradient average, vote) is train/replica_groups.py."""

from __future__ import annotations


def join_quorum(trainer) -> dict:
    """Start a step under fault tolerance: join the quorum (a group behind its peers heals from one of them); a
    process that did not heal and has not trained yet resumes from disk (the whole job restarted); then point
    the loader at the group batch this group trains on in this step. Returns what the metrics log about it."""
    ft = trainer.ft
    first = ft.membership is None
    if first or ft.starts_interval(trainer.step):  # every step under ddp, every sync_every under localsgd/diloco
        healed = ft.start_step(first)
        if first and not healed and trainer.step == 0 and ft.step == 0 and trainer.cfg.checkpoint.resume != "never":
            trainer.maybe_resume()
            ft.set_position(trainer.step, trainer.train_loader.consumed // trainer.group_windows)
        ft.begin_interval()
    if first:
        trainer.mark_started()
    group_batch = ft.group_batch()
    trainer.train_loader.consumed = group_batch * trainer.group_windows
    return {"participants": ft.manager.num_participants(), "group_batch": group_batch}


def abandon_step(trainer, guard_state: dict) -> dict:
    """The quorum failed during this step: drop its gradients (and the detector's and routers' view of it); it is
    retried with the next quorum."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.guard.load_state_dict(guard_state, keep_rollback_counts=True)
    for moe in trainer.pmodel.moe_layers():  # drop the router statistics the failed step accumulated
        moe.balance.reset()
    return {"retry": True}
