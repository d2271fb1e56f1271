"""LoRA: at B = 0 the adapted model is the base model; training moves only the adapters; the checkpoint holds
W + (alpha / r) B A as an ordinary checkpoint that inference loads unchanged."""

from __future__ import annotations

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.inference.generate import load_for_inference
from gigafactory.posttrain.lora import LoRA
from gigafactory.posttrain.options import LoRAOptions
from gigafactory.posttrain.sft import SFTData, SFTTrainer, sft_config
from tests.posttrain.test_sft_masks import tiny_model

TARGETS = ("w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv")


def test_zero_b_is_the_base_model_and_merging_is_the_same_function():
    model = tiny_model()
    x = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        base = model(x)
        lora = LoRA(model, LoRAOptions(rank=4, alpha=8.0), seed=1)
        assert torch.equal(model(x), base)  # B = 0: exactly the base function
        assert sorted({t.param if t.experts else t.name.split(".")[-2] for t in lora.targets.values()}) == sorted(TARGETS)
        assert sum(t.experts for t in lora.targets.values()) == 6  # grok-tiny's FFN is MoE: 2 layers x 3 expert weights
        for b in lora.B.values():
            b.normal_(0, 0.1)
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-3  # the adapters are in the forward pass
        weights = {n: p.clone() for n, p in model.named_parameters()}
        with lora.merged():
            torch.testing.assert_close(model(x), adapted, atol=1e-9, rtol=1e-9)  # one matmul per layer, same function
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # the frozen base, bit for bit
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="matches no layer"):
        LoRA(tiny_model(), LoRAOptions(rank=2, targets="nope"))


def test_lora_sft_trains_only_adapters_and_saves_merged_weights(pretrained):
    overrides = {"training.steps": 2, "training.eval_every": 0, "training.batch_size": 2, "checkpoint.every": 0,
                 "optimizer.lr": 1e-2}
    base_path, cfg = sft_config(str(pretrained / "pre"), run_dir=str(pretrained / "sft-lora"), overrides=overrides)
    trainer = SFTTrainer(cfg, SFTData(base_path, str(pretrained / "chat.jsonl"), lora=LoRAOptions(rank=4)))
    trainer.train()
    trainer.close()
    pre = dict(load_for_inference(pretrained / "pre").model.named_parameters())
    live = dict(trainer.model.named_parameters())
    assert all(torch.equal(live[n], pre[n]) for n in pre)  # the base never moved
    assert all(b.abs().max() > 0 for b in trainer.lora.B.values())  # the adapters did
    saved = dict(load_for_inference(pretrained / "sft-lora").model.named_parameters())  # an ordinary checkpoint
    adapted = {t.name: key for key, t in trainer.lora.targets.items()}
    assert len(adapted) == 14  # attention (4 x 2 layers) and the experts' three weights (x 2 layers)
    for name, p in saved.items():
        if name in adapted:
            delta = trainer.lora.delta(adapted[name])
            torch.testing.assert_close(p, pre[name] + delta.to(p.dtype), atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(p, pre[name]), name


def test_lora_resume_continues_from_the_merged_weights(pretrained):
    """Interrupted after step 1 and run again: the step-1 checkpoint (merged) is the new frozen base, with fresh
    adapters on top; step 2 trains them."""
    overrides = {"training.steps": 2, "training.eval_every": 0, "training.batch_size": 2, "checkpoint.every": 0, "optimizer.lr": 1e-2}
    base_path, cfg = sft_config(str(pretrained / "pre"), run_dir=str(pretrained / "sft-lora-resume"), overrides=overrides)
    data = SFTData(base_path, str(pretrained / "chat.jsonl"), lora=LoRAOptions(rank=4))
    first = SFTTrainer(cfg, data)
    first.train(stop_at=1)
    first.close()
    step1 = dict(load_for_inference(pretrained / "sft-lora-resume").model.named_parameters())
    second = SFTTrainer(cfg, data)
    assert second.train()["start_step"] == 1
    second.close()
    assert all(torch.equal(p, step1[n]) for n, p in second.model.named_parameters())  # the merged weights, frozen
    assert all(b.abs().max() > 0 for b in second.lora.B.values())
    step2 = dict(load_for_inference(pretrained / "sft-lora-resume").model.named_parameters())
    assert any(not torch.equal(step2[n], step1[n]) for n in step1)
