"""Cross-entropy fused with the output head, a chunk of tokens at a time.

The [tokens, vocab] logits never exist whole: Grok-1's 131,072-entry vocabulary makes them 4.3 GB in fp32 for one
8,192-token sequence, plus as much again for their gradient. Each chunk's logits are made, reduced to the loss, and
turned into the head's gradients at once (while they are still in cache), so backward only scales stored gradients.
The model uses it on CPUs, where it is faster. On an H100 (docs/benchmarks.md), 128-token chunks of a 131,072 vocabulary
ran 6x slower than whole logits (that version also rewrote a bf16 copy of dW per chunk) and saved a quarter of the
memory, so CUDA keeps whole logits until GPU-sized chunks are measured.
Shapes: T tokens, D d_model, V vocab, C tokens per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target that adds no loss (prompt tokens in SFT, padding); F.cross_entropy's default
_LOGITS_PER_CHUNK = 1 << 22  # 16 MiB of fp32 logits per chunk (about a CPU's cache), but at least 128 tokens


def head_cross_entropy(h_TD: torch.Tensor, weight_VD: torch.Tensor, targets_T: torch.Tensor, multiplier: float,
                       softcap: float = 0.0, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean over tokens of -log softmax(logits)[target], logits = cap*tanh(((h*multiplier) W^T)/cap) (no cap if 0).

    Targets equal to IGNORE_INDEX count neither in the sum nor in the mean (0 if every target is ignored).
    Equal to F.cross_entropy on the model's logits; matmuls run in the autocast dtype when autocast is on."""
    device = h_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_TD.dtype
    grads = torch.is_grad_enabled()
    want = (grads and h_TD.requires_grad, grads and weight_VD.requires_grad)  # (dh, dW): make only what is needed
    chunk = chunk_tokens or max(128, _LOGITS_PER_CHUNK // weight_VD.shape[0])
    return _HeadCrossEntropy.apply(h_TD, weight_VD, targets_T, multiplier, softcap, dtype, chunk, want)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, weight_VD, targets_T, multiplier, softcap, dtype, chunk, want):
        # Ignored targets are masked unconditionally: asking whether any is ignored would read the count to the host
        # (a sync). The masks act on [C] and [C, D] rows, not on [C, V] logits, and multiply kept rows by exactly 1.
        valid_T = targets_T != IGNORE_INDEX
        n_valid = valid_T.sum().clamp(min=1)  # a device tensor; dividing by it equals dividing by the int
        targets_T = targets_T.masked_fill(~valid_T, 0)
        w_VD = weight_VD.to(dtype)
        loss = torch.zeros((), device=h_TD.device, dtype=torch.float32)
        want_h, want_w = want
        grad_h_TD = torch.empty_like(h_TD) if want_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, device=weight_VD.device, dtype=torch.float32) if want_w else None
        for start in range(0, len(targets_T), chunk):
            h_CD = (h_TD[start:start + chunk] * multiplier).to(dtype)
            targets_C = targets_T[start:start + chunk]
            logits_CV = (h_CD @ w_VD.t()).float()
            if softcap:
                tanh_CV = torch.tanh(logits_CV / softcap)
                logits_CV = tanh_CV * softcap
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            nll_C = lse_C - logits_CV.gather(1, targets_C[:, None]).squeeze(1)
            valid_C = valid_T[start:start + chunk]
            loss += (nll_C * valid_C).sum()
            if not (want_h or want_w):
                continue
            grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place of the logits
            grad_CV[torch.arange(len(targets_C), device=grad_CV.device), targets_C] -= 1.0
            if softcap:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
                grad_CV.mul_(1.0 - tanh_CV.square_())
            grad_CV = grad_CV.to(dtype)  # the dtype the forward matmul ran in
            keep_C1 = valid_C[:, None]  # an ignored target's row of dlogits is zero: zero its contributions instead
            if want_h:
                grad_h_TD[start:start + chunk] = (grad_CV @ w_VD).to(h_TD.dtype) * multiplier * keep_C1
            if want_w:  # accumulated in fp32 in place
                grad_w_VD.addmm_(grad_CV.t().float(), h_CD.float() * keep_C1)
        ctx.save_for_backward(grad_h_TD, grad_w_VD)
        ctx.weight_dtype, ctx.n_tokens = weight_VD.dtype, n_valid
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_TD, grad_w_VD = ctx.saved_tensors
        scale = grad_loss / ctx.n_tokens
        grad_h = None if grad_h_TD is None else grad_h_TD * scale.to(grad_h_TD.dtype)
        grad_w = None if grad_w_VD is None else (grad_w_VD * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None
