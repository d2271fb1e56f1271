"""The training step's host reads, kept to one per step: everything the host needs from the device comes back in a
single transfer.

On a GPU each read of a device value (`.item()`, `float(t)`, `.tolist()`, a blocking copy to or from pageable
memory) waits for every kernel queued so far, so the host stops running ahead and the GPU idles while the next step's
kernels are launched. The step keeps its loss, gradient norm and router losses as device tensors and reads them
together once, after clipping: the anomaly guard must decide on the host whether the optimizer steps, so that one
read is inherent. tests/train/test_host_syncs.py holds the step to `HOST_READS_PER_STEP`.
"""

from __future__ import annotations

import torch

# One batched read per training step (loss, gradient norm, router losses), on one device without expert or pipeline
# parallel. Known additions: expert parallel reads its all-to-all split sizes (one read per MoE layer, inherent:
# the collective takes host lists), torchft's quorum and commit vote (host-side protocol), an anomaly's re-run (one more read), and the
# fallback expert loop (CPU without grouped_mm, CUDA before sm90), which reads the per-expert token counts.
HOST_READS_PER_STEP = 1


def wide_float(device: torch.device) -> torch.dtype:
    """float64, in which the host does its arithmetic, where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def read_scalars(*values: torch.Tensor | float) -> list:
    """Python floats of 0-dim tensors (numbers pass through as they are), with one device-to-host transfer for
    all of them. Each tensor goes through float64, so the floats equal `float(t)` exactly."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    device = tensors[0].device
    wide = wide_float(device)
    read = iter(torch.stack([t.detach().reshape(()).to(device=device, dtype=wide) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else v for v in values]


def sum_on_device(values: list[torch.Tensor | float]) -> torch.Tensor | float:
    """The sum of per-layer scalars in float64, added in order as Python's sum() of their floats would (bitwise the
    same), without reading any of them. A plain float (0 with no tensors) when there is nothing on a device."""
    total: torch.Tensor | float = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(wide_float(value.device))
        total = total + value
    return total


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch to the device. To a GPU through pinned memory and non-blocking: a copy from pageable memory
    waits for the device's queue to drain (a sync at the start of every step)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
