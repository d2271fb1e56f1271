"""The pipeline-parallel path of a training step: one loader batch through the pipeline schedule.

A mixin of Trainer rather than free functions, so post-training overrides `pipeline_batch` (packed documents,
weighted losses) the way it overrides the trainer's other hooks, and DPO can call `run_pipeline` with its own loss.
"""

from __future__ import annotations

import torch

from gigafactory.train.host_reads import wide_float


class PipelineStep:
    """Trainer methods for parallel.pp > 1; they use the trainer's cfg, dims, pmodel, model, device and autocast()."""

    def pipeline_batch(self, inputs: torch.Tensor, targets: torch.Tensor):
        """How one loader batch enters the pipeline schedule: (the first stage's input, keyword arguments of every
        stage's forward, the last stage's target, its loss function or None for the plain one; see
        parallel/pipeline.LastStageLoss). Post-training overrides it (packed documents, weighted losses)."""
        return inputs, {}, targets, None

    def pipeline_loss(self, *batch, train: bool) -> torch.Tensor:
        """Run the pipeline schedule on one loader batch; the mean microbatch loss, known to the last stage (else 0),
        as a 0-dim float64 device tensor (not read here: see train/host_reads.py)."""
        return self.run_pipeline(*self.pipeline_batch(*batch), train=train)

    def run_pipeline(self, inputs, stage_kwargs: dict, target, loss_fn, train: bool) -> torch.Tensor:
        """pipeline_loss for pipeline_batch's four parts (a caller may bring its own loss function)."""
        pm, losses = self.pmodel, []
        stage_kwargs = {k: v.to(self.device) for k, v in stage_kwargs.items()}
        if train and hasattr(pm.schedule, "regroup"):  # global microbatches (parallel/balance.py) regroup the inputs
            stage_kwargs = {k: pm.schedule.regroup(v) for k, v in stage_kwargs.items()}  # and target; these too
        kwargs = {"target": target.to(self.device), "losses": losses} if pm.is_last_stage else {}
        if pm.is_last_stage and loss_fn is not None:
            kwargs["loss_kwargs"] = {"loss": loss_fn}
        args = (inputs.to(self.device),) if pm.is_first_stage else ()
        with self.autocast():
            (pm.schedule.step if train else pm.schedule.eval)(*args, **kwargs, **stage_kwargs)
        wide = wide_float(self.device)
        return torch.stack(losses).mean().to(wide) if losses else torch.zeros((), dtype=wide, device=self.device)

    def tied_copies(self) -> set[int]:
        """The last pipeline stage's copy of a tied embedding: clipped, but counted once (by the first stage)."""
        if self.dims.pp > 1 and not self.pmodel.is_first_stage and self.cfg.model.tie_embeddings and hasattr(self.model, "embed"):
            return {id(self.model.embed.weight)}
        return set()
