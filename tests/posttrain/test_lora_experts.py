"""LoRA on MoE experts: per-expert adapters (A_e, B_e) on the 3-D expert weights, added inside the expert
computation (models/grok/moe.py's Experts.low_rank): exactly the base at B = 0, merged into the 3-D weights as
W_e + (alpha / r) A_e B_e, and only the adapters get gradients."""

from __future__ import annotations

import torch

from gigafactory.models.grok.moe import grouped_matmul
from gigafactory.posttrain.lora import LoRA
from gigafactory.posttrain.options import LoRAOptions
from tests.posttrain.test_sft_masks import tiny_model


def test_grouped_matmul_is_a_matmul_per_expert_on_both_paths():
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no rows too
    for cols in (4, 2):  # 16-byte fp32 rows: one grouped GEMM; 8-byte rows: the loop over experts
        x, w = torch.randn(10, 8), torch.randn(4, 8, cols)
        expected = torch.cat([rows @ w[e] for e, rows in enumerate(x.split(counts.tolist()))])
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)


def test_expert_adapters_are_the_base_at_step_0_merge_per_expert_and_alone_get_gradients():
    model = tiny_model().float()  # fp32: the grouped-GEMM path on CPU
    x = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        base = model(x)
        experts = model.layers["0"].moe.experts
        rows, counts = torch.randn(12, 64), torch.tensor([5, 0, 4, 3])
        plain = experts(rows, counts)
        experts.low_rank = lambda name, x_NI, tokens_per_expert_E: None  # the adapter path with nothing to add
        assert torch.equal(experts(rows, counts), plain)  # gives the plain path's numbers
        experts.low_rank = None
    lora = LoRA(model, LoRAOptions(rank=4, alpha=8.0, targets="w_gate,w_up,w_down"), seed=1)
    assert all(t.experts for t in lora.targets.values()) and len(lora.targets) == 6  # 2 layers x 3 expert weights
    assert lora.A["layers__0__moe__experts__w_down"].shape == (4, 64, 4)  # [E, in, r]: one adapter per expert
    with torch.no_grad():
        assert torch.equal(model(x), base)  # B = 0: exactly the base function
        for b in lora.B.values():
            b.normal_(0, 0.1)
    adapted = model(x)
    assert (adapted - base).abs().max() > 1e-3  # the expert adapters are in the forward pass
    adapted.float().square().mean().backward()
    assert all(p.grad is None for p in model.parameters())  # the frozen base gets no gradient
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora.parameters())
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), lora.merged():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)  # the same function, without adapters
        for key, t in lora.targets.items():
            a, b = lora.A[key], lora.B[key]
            for e in range(a.shape[0]):  # per expert: W_e + (alpha / r) A_e B_e
                torch.testing.assert_close(t.weight[e], weights[t.name][e] + 2.0 * a[e] @ b[e])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # the frozen base, bit for bit
