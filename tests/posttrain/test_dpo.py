"""DPO: the loss against a direct computation, packed pair log-probs against separate runs, and `gigafactory dpo`
end to end (the first step's policy is the reference: loss ln 2, margin 0; the cached reference survives resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gigafactory.cli.main import main
from gigafactory.data.preference import PackedPairLoader, pack_pairs, sequence_logps
from gigafactory.posttrain.dpo import DPOTrainer, dpo_loss
from gigafactory.posttrain.options import DPO_DEFAULTS, DPOOptions
from gigafactory.posttrain.sft import SFTData, sft_config
from tests.posttrain.test_sft_masks import template, tiny_model  # noqa: F401 - a fixture and a helper

PAIRS = [{"messages": [{"role": "user", "content": "Quote John 11:35"}], "chosen": "Jesus wept.", "rejected": "Jesus slept."},
         {"messages": [{"role": "user", "content": "Quote Genesis 1:3"}], "chosen": "And God said, Let there be light: and there was light.",
          "rejected": "And God said, Let there be night."}]


def test_dpo_loss_equals_direct_computation():
    pi_c, pi_r, ref_c, ref_r = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -6.0]), torch.tensor([-3.5, -7.0]), torch.tensor([-3.9, -6.2])
    beta, ls = 0.5, 0.1
    z = [beta * ((a - b) - (c - d)) for a, b, c, d in zip([-3.0, -7.5], [-4.0, -6.0], [-3.5, -7.0], [-3.9, -6.2])]  # 0.45, -0.65
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = {"sigmoid": sum(-(1 - ls) * math.log(sig(x)) - ls * math.log(sig(-x)) for x in z) / 2,
              "ipo": sum((x / beta - 1 / (2 * beta)) ** 2 for x in z) / 2, "hinge": sum(max(0.0, 1 - x) for x in z) / 2}
    for loss_type, want in expect.items():
        loss, stats = dpo_loss(pi_c, pi_r, ref_c, ref_r, DPOOptions(beta, ls, loss_type))
        assert loss.item() == pytest.approx(want, abs=1e-6), loss_type
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] == pytest.approx(sum(z) / 2, abs=1e-6)
    rpo, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, DPOOptions(beta, ls, "sigmoid", sft_weight=0.5), torch.tensor([3.0, 5.0]))
    assert rpo.item() == pytest.approx(expect["sigmoid"] + 0.5 * (3.0 / 3 + 7.5 / 5) / 2, abs=1e-6)  # + the chosen per-token NLL


def test_packed_pair_logps_match_separate_sequences(template):  # noqa: F811
    rows, docs = pack_pairs(PAIRS, template, 127)
    assert len(rows) == 1 and docs.shape[1] == 2  # all four sequences share one row
    inputs, targets, positions, doc_ids, pair_docs, _ = PackedPairLoader(rows, docs, 1, 0, shuffle=False).next_batch()
    model = tiny_model(max_seq_len=128)
    with torch.no_grad():
        seq = sequence_logps(model(inputs, positions, doc_ids_BS=doc_ids), targets, doc_ids, 4)[0]
        for k, pair in enumerate(PAIRS):
            prompt = template.encode(pair["messages"])
            for side in (0, 1):
                reply = template.encoder.encode(pair[("chosen", "rejected")[side]]).ids + [2]
                ids = torch.tensor([prompt + reply])
                logp = F.log_softmax(model(ids)[0, :-1], -1).gather(1, ids[0, 1:, None])[len(prompt) - 1:].sum()
                assert abs(seq[pair_docs[0, k, side]].item() - logp.item()) < 1e-5


def test_dpo_cli_starts_at_the_reference_and_resumes_from_the_cache(pretrained, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    verses = ["Jesus wept.", "The LORD is my shepherd; I shall not want.", "For God so loved the world."]
    data.write_text("".join(json.dumps({"prompt": f"Quote verse {i}", "chosen": v, "rejected": v.replace("e", "a")}) + "\n"
                            for i, v in enumerate(verses * 6)))
    flags = ["--training.steps=3", "--training.eval_every=3", "--training.batch_size=2", "--logging.log_every=1", "--beta=0.2", "--data.seq_len=128"]
    run_a = tmp_path / "dpo-a"
    assert main(["dpo", "--checkpoint", str(pretrained / "pre"), "--data", str(data), f"--logging.run_dir={run_a}", *flags]) == 0
    assert "eval DPO loss" in capsys.readouterr().out
    recs = {r["step"]: r for r in map(json.loads, (run_a / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert recs[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and recs[1]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert recs[3]["reward_margin"] > 0 and "reward_accuracy" in recs[3]
    assert list(run_a.glob("reference-logps-*.pt"))

    overrides = {"training.steps": 3, "training.eval_every": 3, "training.batch_size": 2, "logging.log_every": 1, "data.seq_len": 128}
    base, cfg = sft_config(str(pretrained / "pre"), run_dir=str(tmp_path / "dpo-b"), overrides=overrides, defaults=DPO_DEFAULTS)
    opts, sft = DPOOptions(beta=0.2), SFTData(base, str(data))
    first = DPOTrainer(cfg, sft, opts)
    first.train(stop_at=2)
    first.close()
    second = DPOTrainer(cfg, sft, opts)
    second.initial_weights = lambda: pytest.fail("a resumed run must not recompute the reference")
    second.train()
    second.close()
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "dpo-b" / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert resumed[3] == pytest.approx(recs[3]["loss"], abs=1e-6)
