"""SFT's two masks: no loss on tokens the assistant did not write, no attention across packed conversations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gigafactory.data.chat import ChatTemplate
from gigafactory.data.sft import PackedChatLoader, pack_conversations
from gigafactory.data.tokenizer import plain_text_encoder, train_tokenizer
from gigafactory.models import GrokModel
from gigafactory.models.config import ModelConfig
from gigafactory.models.grok.head_loss import IGNORE_INDEX, head_cross_entropy
from tests.conftest import TINY_MODEL

CONVERSATIONS = [
    [{"role": "system", "content": "Answer with the verse."}, {"role": "user", "content": "Quote Genesis 1:3"},
     {"role": "assistant", "content": "And God said, Let there be light: and there was light."}],
    [{"role": "user", "content": "Quote John 11:35"}, {"role": "assistant", "content": "Jesus wept."},
     {"role": "user", "content": "And the next?"}, {"role": "assistant", "content": "Then said the Jews, Behold how he loved him!"}],
]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    text = [m["content"] for c in CONVERSATIONS for m in c] * 20
    tok = train_tokenizer(text, 400, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return ChatTemplate(tok, plain_text_encoder(tok))


def tiny_model(**extra) -> GrokModel:
    torch.manual_seed(0)
    model = GrokModel(ModelConfig(**{**TINY_MODEL, "vocab_size": 400, **extra}))
    model.init_weights(seed=3)
    return model.double()  # the comparisons are about masks, not rounding


def test_trained_tokens_are_exactly_the_assistant_turns_and_prompts_match_serve(template):
    for conv in CONVERSATIONS:
        ids, trained = template.encode_conversation(conv)
        decoded = template.encoder.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
        assert decoded == "".join(m["content"] + "[EOS]" for m in conv if m["role"] == "assistant")
        for i, m in enumerate(conv):  # what serve prompts with is what training puts before each reply
            if m["role"] == "assistant":
                prompt = template.encode(conv[:i])
                assert ids[:len(prompt)] == prompt and trained[len(prompt) - 1] is False and trained[len(prompt)] is True


def test_fused_head_loss_honours_ignore_index():
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (50,))
    targets[::3] = IGNORE_INDEX
    loss = head_cross_entropy(h, w, targets, 0.5, softcap=5.0, chunk_tokens=7)
    loss.backward()
    logits = 5.0 * torch.tanh((h * 0.5) @ w.t() / 5.0)
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(ref, (h, w))
    assert abs(loss.item() - ref.item()) < 1e-6  # the fused loss makes fp32 logits
    assert torch.allclose(h.grad, gh, atol=1e-6) and torch.allclose(w.grad, gw, atol=1e-6)


def test_loss_and_gradient_ignore_everything_but_assistant_tokens(template):
    """Two conversations that differ only in a user turn after the last reply (so every assistant token sees the
    same context): identical loss and gradients. Without the mask they differ. And the loss is the mean
    cross-entropy of the assistant tokens alone."""
    def batch(last_user: str):
        conv = CONVERSATIONS[1] + [{"role": "user", "content": last_user}]
        return PackedChatLoader(pack_conversations([template.encode_conversation(conv)], 63), 1, 0, shuffle=False).next_batch()[:4]

    def loss_and_grads(inputs, targets, positions, doc_ids):
        model = tiny_model(aux_loss_weight=0.0, router_z_loss_weight=0.0)  # router regularisers see every token by design
        loss = model(inputs, positions, targets_BS=targets, doc_ids_BS=doc_ids)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], model

    a, b = batch("Thanks. Another one?"), batch("Quote Genesis 1:3 too")
    assert not torch.equal(a[0], b[0])
    loss_a, grads_a, model = loss_and_grads(*a)
    loss_b, grads_b, _ = loss_and_grads(*b)
    assert loss_a == pytest.approx(loss_b, abs=1e-9)
    assert all(torch.allclose(x, y, atol=1e-9) for x, y in zip(grads_a, grads_b))

    unmasked = [loss_and_grads(x[0], torch.cat([x[0][:, 1:], x[1][:, -1:]], 1), *x[2:])[0] for x in (a, b)]
    assert abs(unmasked[0] - unmasked[1]) > 1e-3  # the test would catch a loss on user tokens

    inputs, targets, positions, doc_ids = a
    with torch.no_grad():
        logits = model(inputs, positions, doc_ids_BS=doc_ids)[0]
    keep = targets[0] != IGNORE_INDEX
    assert loss_a == pytest.approx(F.cross_entropy(logits[keep], targets[0][keep]).item(), abs=1e-5)


@pytest.mark.parametrize("softcap", [30.0, 0.0])  # Grok's capped eager path and the SDPA path
def test_packed_conversations_match_separate_runs(template, softcap):
    encoded = [template.encode_conversation(c) for c in CONVERSATIONS]
    loader = PackedChatLoader(pack_conversations(encoded, 127), 1, 0, shuffle=False)
    inputs, targets, positions, doc_ids, _ = loader.next_batch()
    assert doc_ids[0, 0] != doc_ids[0, len(encoded[0][0])]  # both conversations share the row
    model = tiny_model(attn_softcap=softcap, max_seq_len=128)
    with torch.no_grad():
        packed = F.log_softmax(model(inputs, positions, doc_ids_BS=doc_ids)[0], -1)
        unmasked = F.log_softmax(model(inputs, positions)[0], -1)
        at = 0
        for ids, _ in encoded:
            alone = F.log_softmax(model(torch.tensor([ids]))[0], -1)
            assert (packed[at:at + len(ids)] - alone).abs().max().item() < 1e-5
            at += len(ids)
    second = slice(len(encoded[0][0]), at)
    assert (packed[second] - unmasked[second]).abs().max().item() > 1e-3  # without the mask it would differ


def test_flex_document_mask_equals_eager(template, monkeypatch):
    """The FlexAttention block mask (CUDA's path) with document ids computes the eager path's attention; run
    uncompiled on CPU without gradients, as tests/models does for the causal mask."""
    import dataclasses

    import gigafactory.models.grok.model as model_mod
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(model_mod, "_compiled_flex_attention", lambda: flex_attention)
    encoded = [template.encode_conversation(c) for c in CONVERSATIONS]
    inputs, _, positions, doc_ids = PackedChatLoader(pack_conversations(encoded, 127), 1, 0, shuffle=False).next_batch()[:4]
    eager = tiny_model(max_seq_len=128).float()
    flex = GrokModel(dataclasses.replace(eager.cfg, attn_impl="flex"))
    flex.load_state_dict(eager.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(flex(inputs, positions, doc_ids_BS=doc_ids), eager(inputs, positions, doc_ids_BS=doc_ids), atol=1e-4, rtol=1e-4)
