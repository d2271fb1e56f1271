"""Issue 18 §4: exports that transformers users pick up as they are, and that say where the engines deviate.

transformers is a test dependency (pyproject [test]), so these run on every change; nothing here is skipped.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gigafactory.cli.main import main
from gigafactory.data.tokenizer import train_tokenizer
from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.interop import export_checkpoint
from gigafactory.serve.chat_template import ChatTemplate
from tests.interop.test_export import SMALL, trained_checkpoint

GROK2_STYLE = dict(dense_ffn_dim=48, final_logit_softcap=50.0, router_softcap=30.0, tie_embeddings=False)


@pytest.mark.parametrize("fmt,overrides", [("hf-grok1", {}), ("sglang-grok", {}), ("sglang-grok", GROK2_STYLE)],
                         ids=["hf-grok1", "sglang-grok", "sglang-grok2"])
def test_grok_exports_load_in_transformers_or_fail_loudly(tmp_path, fmt, overrides):
    ckpt, model = trained_checkpoint(tmp_path / "run", "grok-tiny", **overrides)
    export_checkpoint(ckpt, fmt, tmp_path / "export", dtype="fp32")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "gigafactory-grok"  # was "git": a random GitForCausalLM, 273 missing keys, no error
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True,
                                                                 dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    prompt = tokens[0, :6].tolist()
    greedy = list(generate_tokens(model, prompt, SamplingParams(temperature=0.0, max_tokens=10)))
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10)[0, len(prompt):].tolist()
    assert out[: len(greedy)] == greedy and (len(greedy) == 10 or out[len(greedy)] == 2)


@pytest.mark.parametrize("roles", [True, False], ids=["role-tokens", "plain"])
def test_tokenizer_files_render_serves_chat_template(tmp_path, roles):
    ckpt, _ = trained_checkpoint(tmp_path / "run", "grok-tiny")
    text = ["the user said hello to grok, and grok answered briefly."] * 20
    if roles:
        tok = train_tokenizer(text, 384, ckpt / "tokenizer.json")
    else:  # a tokenizer trained before the chat roles existed: serve falls back to "Role: text" turns
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok.save(str(ckpt / "tokenizer.json"))
    export_checkpoint(ckpt, "hf-grok1", tmp_path / "export")
    hft = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"), trust_remote_code=True)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello grok"}]
    ids = hft.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == ChatTemplate(tok, tok).encode(messages)
    assert hft.model_max_length == SMALL["max_seq_len"]
    assert ({"<|system|>", "<|user|>", "<|assistant|>"} <= set(hft.all_special_tokens)) == roles
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "export"))
    assert (generation.temperature, generation.top_p, generation.top_k, generation.eos_token_id) == (0.8, 0.95, 0, 2)


def test_export_states_engine_deviations_and_writes_the_models_router_cap(tmp_path, capsys):
    trained_checkpoint(tmp_path / "run", "grok-tiny")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "sglang-grok", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: SGLang caps router logits at 30 (the model: 0)" in err
    assert "exact erf GELU" in err and "the logits differ by up to" in err
    assert json.loads((tmp_path / "s" / "config.json").read_text())["router_logit_softcapping"] == 0.0  # was 30.0
    trained_checkpoint(tmp_path / "mrun", "mixtral-tiny")
    assert main(["export", "--checkpoint", str(tmp_path / "mrun"), "--format", "hf-mixtral", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
