"""The tokenizer and generation files of an export, so that transformers (and vLLM) chat and sample as we do.

- tokenizer_config.json: `PreTrainedTokenizerFast` over our tokenizer.json, the four special tokens, the chat roles
  declared special, `model_max_length` = the model's context, and a `chat_template` that renders exactly what
  `gigafactory serve` encodes (gigafactory/serve/chat_template.py): `<|role|>content[EOS]` per turn and a final
  `<|assistant|>` when the tokenizer has role tokens, else `Role: content` + a blank line and a final `Assistant:`.
- generation_config.json: the ids, and `gigafactory generate`'s sampling defaults (transformers' own defaults, e.g.
  top_k 50, would sample differently).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gigafactory.models.config import ModelConfig

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
ROLE_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '[EOS]' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# `gigafactory generate`'s defaults (gigafactory/cli/generate.py)
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "max_new_tokens": 100}


def generation_config(pad_id: int, bos_id: int, eos_id: int) -> dict:
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, **SAMPLING}


def tokenizer_config(tokenizer_json: Path, cfg: ModelConfig) -> dict:
    """tokenizer_config.json for `tokenizer_json` (its role tokens decide which chat template serve uses)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    has_roles = all(tokenizer.token_to_id(t) is not None for t in ROLE_TOKENS)  # serve's own test (ChatTemplate)
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL, "model_max_length": cfg.max_seq_len,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": ROLE_TEMPLATE if has_roles else PLAIN_TEMPLATE,
    }
    if has_roles:
        out["additional_special_tokens"] = ROLE_TOKENS  # transformers 4.x
        out["extra_special_tokens"] = {"system_token": "<|system|>", "user_token": "<|user|>", "assistant_token": "<|assistant|>"}  # 5.x
    return out


def write_tokenizer_files(tokenizer_json: Path | None, out: Path, cfg: ModelConfig, ids: tuple[int, int, int]) -> None:
    """generation_config.json always; tokenizer.json + tokenizer_config.json when the checkpoint has a tokenizer."""
    (out / "generation_config.json").write_text(json.dumps(generation_config(*ids), indent=2) + "\n")
    if tokenizer_json is None:
        return
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer_json, cfg), indent=2) + "\n")
