"""Load a Gigafactory checkpoint and generate text with a KV cache, streaming tokens as they come."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from gigafactory.config.job import JobConfig
from gigafactory.config.loader import load_config
from gigafactory.data.tokenizer import EOS_ID, load_tokenizer
from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams, sample_next
from gigafactory.models import GrokModel, KVCache
from gigafactory.train.checkpoint import load_checkpoint
from gigafactory.train.checkpoint_files import resolve_checkpoint


@dataclass
class LoadedModel:
    model: GrokModel
    tokenizer: Tokenizer
    config: JobConfig
    checkpoint: Path


def check_device(device: str, flag: str = "--device") -> torch.device:
    """The torch device for a user-given name, or a one-line error (an unknown name, or CUDA on a CPU-only build)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: this PyTorch build or machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UserError(f"{flag} {device}: only cpu and cuda are supported")
    return dev


def load_checkpoint_files(path: str | Path):
    """(tokenizer, job config, checkpoint directory) of a checkpoint, without its weights (serve's HTTP process
    needs only these; the engine process loads the weights)."""
    ckpt = resolve_checkpoint(path)
    config_file = ckpt / "config.toml"
    if not config_file.is_file():
        raise UserError(f"checkpoint '{ckpt}' has no config.toml; it was not written by `gigafactory train`")
    return load_tokenizer(ckpt / "tokenizer.json"), load_config(config_path=str(config_file)), ckpt


def load_for_inference(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Build the model from the checkpoint's own config.toml, load its weights, and its tokenizer."""
    check_device(device)
    tokenizer, cfg, ckpt = load_checkpoint_files(path)
    with torch.device("meta"):
        model = GrokModel(cfg.model)
    model.to_empty(device=device)
    model.reset_buffers()
    load_checkpoint(ckpt, model)
    model.eval()
    return LoadedModel(model, tokenizer, cfg, ckpt)


@torch.no_grad()
def generate_tokens(model: GrokModel, prompt_ids: list[int], params: SamplingParams, seed: int = 0,
                    use_cache: bool = True, stop_at_eos: bool = True) -> Iterator[int]:
    """Yield sampled token ids one at a time. use_cache=False recomputes the whole prefix each step (reference)."""
    params.validate()
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) >= max_len:
        raise UserError(f"prompt has {len(prompt_ids)} tokens; the model's context is {max_len}; shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed % 2**64)  # any int (a 22-digit --seed too)
    budget = min(params.max_tokens, max_len - len(prompt_ids))
    ids = list(prompt_ids)
    cache = KVCache.allocate(model.cfg, 1, max_len, device=device) if use_cache else None
    step_ids, start = ids, 0
    for _ in range(budget):
        tokens = torch.tensor([step_ids], device=device)
        if use_cache:
            positions = torch.arange(start, start + len(step_ids), device=device)[None]
            logits = model(tokens, positions, cache)
        else:
            logits = model(tokens)
        next_id = sample_next(logits[0, -1], params, generator, ids[len(prompt_ids):])
        if stop_at_eos and next_id == EOS_ID:
            return
        yield next_id
        ids.append(next_id)
        if use_cache:
            start, step_ids = len(ids) - 1, [next_id]
        else:
            step_ids = ids


def stream_text(tokenizer: Tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Turn a token stream into text pieces; a piece is emitted once its bytes decode completely."""
    ids: list[int] = []
    emitted = ""
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        yield text[len(emitted):]
        emitted = text
