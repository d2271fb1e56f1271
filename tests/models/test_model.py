"""The Grok model against its specification: shapes, causality, caps, routing, counts, KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gigafactory.models import GrokModel, KVCache, count_params, get_preset
from gigafactory.models.config import ModelConfig
from gigafactory.models.grok.model import rope_cos_sin

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=32, n_experts=4, top_k=2, moe_ffn_dim=40)


def build(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = GrokModel(cfg)
    model.init_weights(seed)
    return model.eval()


def test_logits_shape_and_param_count_match_the_formula():
    model = build()
    assert model(torch.randint(0, 97, (3, 11))).shape == (3, 11, 97)
    assert sum(p.numel() for p in model.parameters()) == count_params(CFG).total
    for preset in ("grok-2", "mixtral-tiny"):
        cfg = get_preset(preset)
        with torch.device("meta"):
            meta_model = GrokModel(cfg)
        assert sum(p.numel() for p in meta_model.parameters()) == count_params(cfg).total


def test_later_tokens_never_change_earlier_logits():
    model = build()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-5, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def reference_attention(attn, x, cfg):
    """Grok attention written from the spec, one head at a time: q.k * scale, 30 tanh(./30), causal, softmax fp32."""
    B, S, _ = x.shape
    hd, group = cfg.resolved_head_dim, cfg.n_heads // cfg.n_kv_heads
    q = (x @ attn.wq.weight.T).view(B, S, cfg.n_heads, hd)
    k = (x @ attn.wk.weight.T).view(B, S, cfg.n_kv_heads, hd)
    v = (x @ attn.wv.weight.T).view(B, S, cfg.n_kv_heads, hd)
    pos = torch.arange(S)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)  # [S, hd]

    def rope(t):  # t: [B, S, hd], NeoX half split
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * ang.cos() + torch.cat([-t2, t1], -1) * ang.sin()

    heads = []
    for h in range(cfg.n_heads):
        qh, kh, vh = rope(q[:, :, h]), rope(k[:, :, h // group]), v[:, :, h // group]
        s = qh @ kh.transpose(1, 2) * cfg.resolved_attn_scale
        s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
        s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
        heads.append(s.softmax(-1) @ vh)
    return torch.cat(heads, -1) @ attn.wo.weight.T


def test_attention_matches_spec_including_the_logit_cap():
    cfg = CFG
    attn = build().layers["0"].attn
    with torch.no_grad():
        attn.wq.weight.mul_(40)  # large logits, so the 30 * tanh cap is far from the identity
        attn.wk.weight.mul_(40)
    x = torch.randn(2, 12, cfg.d_model)
    pos = torch.arange(12).expand(2, 12)
    cos, sin = rope_cos_sin(pos, cfg.resolved_head_dim, cfg.rope_theta)
    ours = attn(x, cos, sin, pos)
    torch.testing.assert_close(ours, reference_attention(attn, x, cfg), atol=1e-4, rtol=1e-4)
    uncapped = dataclasses.replace(cfg, attn_softcap=1e9)  # the cap must matter at these logits
    assert (reference_attention(attn, x, uncapped) - ours).abs().max() > 1e-2


def test_final_logit_softcap_bounds_logits():
    cfg = dataclasses.replace(CFG, final_logit_softcap=5.0, output_multiplier=100.0, tie_embeddings=False)
    logits = build(cfg)(torch.randint(0, 97, (2, 8)))
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.0


def naive_moe(moe, x_TD):
    """Every token through its top-k experts one at a time."""
    probs = (x_TD.float() @ moe.router.weight.float().T).softmax(-1)
    gates, experts = probs.topk(moe.top_k, dim=-1)
    out = torch.zeros_like(x_TD)
    ex = moe.experts
    for t in range(x_TD.shape[0]):
        for g, e in zip(gates[t], experts[t]):
            x = x_TD[t]
            out[t] += g * ((F.gelu(x @ ex.w_gate[e], approximate="tanh") * (x @ ex.w_up[e])) @ ex.w_down[e])
    return out


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_moe_equals_naive_per_token_reference(grouped, monkeypatch):
    import gigafactory.models.grok.moe as moe_mod

    if not grouped:
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda x: False)
    moe = build().layers["1"].moe
    x = torch.randn(3, 10, CFG.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).reshape(30, -1), naive_moe(moe, x.reshape(30, -1)), atol=1e-5, rtol=1e-5)


def test_router_sends_each_token_to_exactly_top_k_distinct_experts():
    moe = build().layers["0"].moe
    gates, experts, probs, _ = moe.router(torch.randn(50, CFG.d_model))
    assert experts.shape == (50, CFG.top_k)
    assert all(len(set(row.tolist())) == CFG.top_k for row in experts)
    torch.testing.assert_close(gates, probs.topk(CFG.top_k, -1).values)  # raw probabilities, not renormalised
    with torch.no_grad():
        moe(torch.randn(1, 50, CFG.d_model))
    assert int(moe.last_tokens_per_expert.sum()) == 50 * CFG.top_k


def test_aux_loss_gradient_reaches_the_router():
    model = build()
    model.train()
    logits = model(torch.randint(0, 97, (2, 8)))
    router = model.layers["0"].moe.router.weight
    (logits * 0).sum().backward()  # the main loss contributes nothing: any router gradient is the aux loss's
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.layers["0"].moe.last_aux_loss > 0


def test_grok1_on_meta_device_has_the_published_size():
    cfg = get_preset("grok-1")
    with torch.device("meta"):
        model = GrokModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    counts = count_params(cfg)
    assert total == counts.total
    assert 314e9 <= total <= 316e9
    assert 83.5e9 <= counts.active <= 86e9  # 83.76B with the tied embedding counted once (README: "~86B")
    assert math.isclose(cfg.embedding_multiplier, math.sqrt(6144))


def test_kv_cached_decoding_equals_full_recompute():
    model = build()
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = KVCache.allocate(CFG, 2, 32)
    prefill = model(tokens[:, :12], torch.arange(12).expand(2, 12), cache)
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=1e-5)
    for t in range(12, 20):
        step = model(tokens[:, t : t + 1], torch.full((2, 1), t), cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights_on_meta_materialisation():
    a = build(seed=3)
    with torch.device("meta"):
        b = GrokModel(CFG)
    b.to_empty(device="cpu")
    b.init_weights(3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_flex_capped_attention_equals_materialised_logits(monkeypatch):
    """The fused path (GPU default) computes the same capped, causal attention; run uncompiled here (CPU, no grad)."""
    import gigafactory.models.grok.model as model_mod
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(model_mod, "_compiled_flex_attention", lambda: flex_attention)
    eager = build()
    flex = GrokModel(dataclasses.replace(CFG, attn_impl="flex"))
    flex.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, CFG.vocab_size, (2, 24))
    positions = torch.stack([torch.arange(24), torch.arange(24) + 7])  # absolute positions per row
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens, positions), eager(tokens, positions), atol=1e-5, rtol=1e-5)
    assert not model_mod.use_flex(dataclasses.replace(CFG, attn_impl="auto"), torch.device("cpu"))


def test_compiled_blocks_match_eager_in_fp32():
    """training.compile on CPU in fp32: loss and gradients equal eager (guards the grouped-GEMM fallback in traces)."""
    from gigafactory.parallel.parallelize import apply_compile

    one_layer = dataclasses.replace(CFG, n_layers=1)
    eager, compiled = build(one_layer), build(one_layer)
    apply_compile(compiled)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    losses = []
    for model in (eager, compiled):
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("final_softcap", [0.0, 5.0])
def test_fused_head_loss_equals_cross_entropy_on_logits(final_softcap):
    """model(tokens, targets_BS=...) (chunked, gradients made in forward) = F.cross_entropy(model(tokens)), grads too."""
    from gigafactory.models.grok.head_loss import head_cross_entropy

    cfg = dataclasses.replace(CFG, final_logit_softcap=final_softcap)
    ref, fused = build(cfg), build(cfg)
    tokens, targets = torch.randint(0, cfg.vocab_size, (2, 2, 13)).unbind(0)
    ref_loss = F.cross_entropy(ref(tokens).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    fused_loss = fused(tokens, targets_BS=targets)
    (fused_loss * 3.0).backward()  # the incoming gradient scales what backward returns
    torch.testing.assert_close(fused_loss, ref_loss)
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, 3.0 * p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)

    h = torch.randn(26, cfg.d_model, requires_grad=True)
    w = ref.embed.weight.detach().requires_grad_()
    chunked = head_cross_entropy(h, w, targets.flatten(), 0.5, final_softcap, chunk_tokens=5)  # 6 chunks, last short
    whole = head_cross_entropy(h, w, targets.flatten(), 0.5, final_softcap, chunk_tokens=26)
    torch.testing.assert_close(chunked, whole)
    with torch.no_grad():  # evaluation: no gradients are made
        torch.testing.assert_close(fused(tokens, targets_BS=targets), ref_loss)
    whole.backward()  # a frozen head: only dh is made, and it matches the chunked path's
    h_only = h.detach().requires_grad_()
    head_cross_entropy(h_only, w.detach(), targets.flatten(), 0.5, final_softcap, chunk_tokens=5).backward()
    torch.testing.assert_close(h_only.grad, h.grad)


# ---- router balance loss over the global batch ------------------------------------------------------------------
def _explicit_router_loss_model(cfg):
    """The model with the balance loss written out as autograd sees it on one process: aux_w * E * sum f_e P_e per
    layer over the whole batch (f from the counts, no gradient), plus z-loss; the model's own attachment is off."""
    model = build(cfg).train()
    captured = []
    for moe in model.moe_layers():
        moe.aux_loss_weight = moe.z_loss_weight = 0.0
        moe.router.register_forward_hook(lambda mod, args, out: captured.append(out))

    def loss_fn(tokens):
        captured.clear()
        main = model(tokens).logsumexp(-1).mean()
        aux = 0.0
        for _, experts_TK, probs_TE, logits_TE in captured:
            counts_E = torch.bincount(experts_TK.flatten(), minlength=cfg.n_experts)
            fraction_E = counts_E.float() / counts_E.sum()
            aux = aux + cfg.aux_loss_weight * cfg.n_experts * (fraction_E * probs_TE.mean(0)).sum()
            aux = aux + cfg.router_z_loss_weight * torch.logsumexp(logits_TE, -1).square().mean()
        return main + aux

    return model, loss_fn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_router_losses_equal_the_switch_formula_on_the_whole_batch(z_loss):
    cfg = dataclasses.replace(CFG, aux_loss_weight=0.05, router_z_loss_weight=z_loss)
    tokens = torch.randint(0, cfg.vocab_size, (4, 12))
    ref_model, ref_loss = _explicit_router_loss_model(cfg)
    ref_loss(tokens).backward()
    model = build(cfg).train()
    model(tokens).logsumexp(-1).mean().backward()
    ref = _grads(ref_model)
    assert ref.keys() == _grads(model).keys()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-5, atol=1e-7, msg=name)
    counts = model.layers["0"].moe.last_tokens_per_expert
    assert int(counts.sum()) == 4 * 12 * cfg.top_k and float(model.layers["0"].moe.last_aux_loss) > 0


def _explicit_microbatch_router_loss(cfg, n_chunks):
    """One process running a batch as n_chunks microbatches, the balance loss written out: microbatch m adds
    aux_w * E * sum_e f_e P_e / n_chunks per layer, f from the counts of microbatches 1..m (no gradient), P its mean."""
    model = build(cfg).train()
    captured = []
    for moe in model.moe_layers():
        moe.aux_loss_weight = moe.z_loss_weight = 0.0
        moe.router.register_forward_hook(lambda mod, args, out: captured.append(out))

    def loss_fn(tokens):
        total, counts_so_far = 0.0, [0] * cfg.n_layers
        for chunk in tokens.chunk(n_chunks):
            captured.clear()
            loss = model(chunk).logsumexp(-1).mean()
            for layer, (_, experts_TK, probs_TE, logits_TE) in enumerate(captured):
                counts_so_far[layer] = counts_so_far[layer] + torch.bincount(experts_TK.flatten(), minlength=cfg.n_experts)
                fraction_E = counts_so_far[layer].float() / counts_so_far[layer].sum()
                loss = loss + cfg.aux_loss_weight * cfg.n_experts * (fraction_E * probs_TE.mean(0)).sum()
                loss = loss + cfg.router_z_loss_weight * torch.logsumexp(logits_TE, -1).square().mean()
            total = total + loss / n_chunks
        return total

    return model, loss_fn


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("order", ["forwards_first", "one_forward_one_backward"])
def test_microbatch_balance_loss_is_the_same_whatever_the_backward_order(checkpointed, order):
    """A batch run as microbatches with `accumulate` (pipeline microbatches, gradient accumulation): microbatch m's f
    covers microbatches 1..m and is fixed at its forward, so running every forward first (gpipe) or each backward
    right after its forward (1f1b's steady state, accumulation) gives the same gradients, equal to the written-out
    loss; activation checkpointing's recomputed forwards neither count their tokens again nor change f."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = dataclasses.replace(CFG, aux_loss_weight=0.05, router_z_loss_weight=1e-3)
    tokens, n_chunks = torch.randint(0, cfg.vocab_size, (4, 12)), 4
    ref_model, ref_loss = _explicit_microbatch_router_loss(cfg, n_chunks)
    ref_loss(tokens).backward()

    chunked = build(cfg).train()
    if checkpointed:
        for name in list(chunked.layers):
            chunked.layers[name] = checkpoint_wrapper(chunked.layers[name], preserve_rng_state=False)
    for moe in chunked.moe_layers():
        moe.balance.accumulate, moe.aux_loss_scale = True, 1.0 / n_chunks
    losses = []
    for chunk in tokens.chunk(n_chunks):
        losses.append(chunked(chunk).logsumexp(-1).mean())
        if order == "one_forward_one_backward":
            (losses[-1] / n_chunks).backward()
    if order == "forwards_first":
        for loss in reversed(losses):
            (loss / n_chunks).backward()
    assert [int(m.balance.step_counts_E.sum()) for m in chunked.moe_layers()] == [4 * 12 * cfg.top_k] * cfg.n_layers
    for moe in chunked.moe_layers():
        moe.balance.reset()
    ref = _grads(ref_model)
    for name, grad in _grads(chunked).items():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(grad, ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(float(m.last_aux_loss) > 0 for m in chunked.moe_layers())


def test_one_microbatch_has_the_whole_batch_f_and_more_microbatches_differ():
    """The unit is the microbatch: with one per step the written-out per-microbatch loss is the whole batch's Switch
    loss, and with four it is a different loss (so layouts are compared at equal microbatch counts)."""
    cfg = dataclasses.replace(CFG, aux_loss_weight=0.05, router_z_loss_weight=0.0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 12))
    whole_model, whole_loss = _explicit_router_loss_model(cfg)
    one_model, one_loss = _explicit_microbatch_router_loss(cfg, 1)
    four_model, four_loss = _explicit_microbatch_router_loss(cfg, 4)
    for model, loss_fn in ((whole_model, whole_loss), (one_model, one_loss), (four_model, four_loss)):
        loss_fn(tokens).backward()
    router = "layers.0.moe.router.weight"
    torch.testing.assert_close(_grads(one_model)[router], _grads(whole_model)[router])
    assert not torch.allclose(_grads(four_model)[router], _grads(whole_model)[router], rtol=1e-3, atol=0)
