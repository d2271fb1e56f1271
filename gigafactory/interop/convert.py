"""The conversions behind `gigafactory import` and `gigafactory export`; each streams one tensor at a time."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from gigafactory.errors import UserError
from gigafactory.interop.grok1 import Grok1Checkpoint
from gigafactory.interop.hf_config import model_config_from_json, read_config_json
from gigafactory.interop.hf_tokenizer import write_tokenizer_files
from gigafactory.interop.layouts import (
    BOS_ID, EOS_ID, FORMATS, HF_CODE_FILES, PAD_ID, Entry, check_exportable, config_json, detect_format, entries,
)
from gigafactory.interop.storage import (
    DEFAULT_SHARD_BYTES, DTYPES, GigafactorySource, OutTensor, SafetensorsSource, output_dir, write_gigafactory_checkpoint,
    write_safetensors_shards,
)
from gigafactory.models.config import ModelConfig


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Gigafactory parameter name and shape for `cfg` (built on the meta device: no memory)."""
    from gigafactory.models import GrokModel

    with torch.device("meta"):
        model = GrokModel(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class _OneTensorCache:
    """Keeps only the most recently read source tensor (export reads each stacked parameter once for E experts)."""

    def __init__(self, get):
        self._get, self._key, self._value = get, None, None

    def __call__(self, key: str) -> torch.Tensor:
        if key != self._key:
            self._key, self._value = None, None  # drop the old tensor before reading the next
            self._value, self._key = self._get(key), key
        return self._value


# ---- import: Grok-1 release -> Gigafactory --------------------------------------------------------------------
def import_grok1(source_dir: str | Path, out_dir: str | Path, cfg: ModelConfig, tokenizer_json: str | Path | None = None,
                 dtype: str = "bf16", progress: bool = False) -> Path:
    """Convert a released Grok-1 checkpoint directory to a Gigafactory checkpoint under `out_dir` (returned).

    Quantised weights are dequantised to `dtype` (bf16 by default); the fp32 embedding, norms and router stay fp32.
    Memory: one source file (int8 or fp32) plus its converted copy at a time."""
    cfg.validate()
    if cfg.dense_ffn_dim or cfg.norm_placement != "sandwich" or not cfg.tie_embeddings:
        raise UserError("the Grok-1 release has sandwich norms, tied embeddings and no dense FFN; use --preset grok-1 (with size overrides)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    reader = Grok1Checkpoint(source_dir, cfg, DTYPES[dtype])
    shapes = parameter_shapes(cfg)
    tensors = []
    for param in reader.params:
        stored = torch.float32 if param.key.endswith(("norm.weight", "router.weight", "embed.weight")) else DTYPES[dtype]
        tensors.append(OutTensor(param.key, shapes[param.key], stored, lambda p=param: reader.load(p, shapes[p.key])))
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _find_tokenizer(tokenizer_json, [reader.dir, reader.dir.parent], cfg.vocab_size, Path(scratch))
        with output_dir(out_dir) as out:
            return write_gigafactory_checkpoint(out, cfg, tensors, tokenizer, progress, "importing Grok-1")


def _find_tokenizer(explicit: str | Path | None, search: list[Path], vocab_size: int, scratch: Path) -> Path | None:
    """The tokenizer.json to store, checked now (a binary or foreign file would only fail later, in `generate`).

    Without --tokenizer: a tokenizer.json beside --from, else the release's SentencePiece tokenizer.model, converted
    (interop/sentencepiece.py) into `scratch`. --tokenizer takes either kind (a .model file is converted)."""
    from gigafactory.data.tokenizer import load_tokenizer

    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise UserError(f"tokenizer file '{p}' not found; pass a tokenizer.json or the release's tokenizer.model with --tokenizer")
    else:
        found = [d / name for name in ("tokenizer.json", "tokenizer.model") for d in search if (d / name).is_file()]
        if not found:
            return None
        p = found[0]
    if p.suffix == ".model":
        from gigafactory.interop.sentencepiece import convert_spm

        converted = scratch / "tokenizer.json"
        convert_spm(p).save(str(converted))
        p = converted
    tokenizer = load_tokenizer(p)  # a UserError naming the file if it is not a usable tokenizer.json
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(f"tokenizer file '{p}' has {tokenizer.get_vocab_size()} tokens, more than the model's {vocab_size}; "
                        "pass the tokenizer the checkpoint was trained with")
    return p


# ---- export: Gigafactory -> safetensors layout ---------------------------------------------------------------
def export_checkpoint(checkpoint: str | Path, fmt: str, out_dir: str | Path, dtype: str = "bf16",
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> list[Path]:
    """Write `fmt` (see FORMATS) safetensors shards, the index json, config.json and the tokenizer into `out_dir`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = GigafactorySource(checkpoint)
    cfg = source.cfg
    check_exportable(fmt, cfg)
    with output_dir(out_dir) as out:
        return _export(source, fmt, out, dtype, max_shard_bytes, progress)


def _export(source: GigafactorySource, fmt: str, out: Path, dtype: str, max_shard_bytes: int, progress: bool) -> list[Path]:
    cfg = source.cfg
    get = _OneTensorCache(source.get)
    target = DTYPES[dtype]

    def producer(entry: Entry):
        def make() -> torch.Tensor:
            t = get(entry.key)
            if entry.expert is not None:
                t = t[entry.expert]
            return t.t() if entry.transpose else t
        return make

    shapes = parameter_shapes(cfg)
    tensors = []
    for entry in entries(fmt, cfg):
        shape = shapes[entry.key][1:] if entry.expert is not None else shapes[entry.key]
        tensors.append(OutTensor(entry.name, tuple(reversed(shape)) if entry.transpose else shape, target, producer(entry)))
    files = write_safetensors_shards(out, tensors, max_shard_bytes, progress, f"exporting {fmt}")
    (out / "config.json").write_text(json.dumps(config_json(fmt, cfg, dtype), indent=2) + "\n")
    if fmt != "hf-mixtral":
        for name in HF_CODE_FILES:
            shutil.copyfile(Path(__file__).parent / "hf_code" / name, out / name)
    write_tokenizer_files(source.tokenizer_json, out, cfg, (PAD_ID, BOS_ID, EOS_ID))
    return files


# ---- import: safetensors layout -> Gigafactory ----------------------------------------------------------------
def import_safetensors(source_dir: str | Path, out_dir: str | Path, progress: bool = False) -> Path:
    """Read a directory in any of FORMATS (detected from config.json and names) back into a Gigafactory checkpoint."""
    src = Path(source_dir).expanduser()
    config_file = src / "config.json"
    if not config_file.is_file():
        raise UserError(f"'{src}' has no config.json; pass a directory written by `gigafactory export` (or a Mixtral/Grok HF checkpoint)")
    config = read_config_json(config_file)
    reader = SafetensorsSource(src)
    fmt = detect_format(config, set(reader.names()))
    cfg = model_config_from_json(fmt, config, str(config_file))
    shapes = parameter_shapes(cfg)
    by_key: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries(fmt, cfg):
        if entry.name == "lm_head.weight" and entry.key == "embed.weight":
            continue  # sglang-grok's copy of a tied embedding
        by_key[entry.key].append(entry)
    missing = sorted(e.name for es in by_key.values() for e in es if e.name not in reader.location)
    if missing:
        raise UserError(f"'{src}' lacks {len(missing)} tensors of the {fmt} layout (first: {missing[0]}); use a complete export")
    layout = {e.name for e in entries(fmt, cfg)}
    unknown = sorted(set(reader.names()) - layout)
    if unknown:  # an added bias or adapter would otherwise be dropped and the imported model differ from the file's
        raise UserError(f"'{src}' has {len(unknown)} tensor(s) that the {fmt} layout does not have (first: {unknown[0]}); "
                        "Gigafactory cannot represent them, so the import stops rather than drop them")

    def producer(key: str):
        def make() -> torch.Tensor:
            parts = by_key[key]
            if parts[0].expert is None:
                t = reader.get(parts[0].name)
                return t.t() if parts[0].transpose else t
            stacked = torch.empty(shapes[key], dtype=reader.dtype(parts[0].name))
            for e in parts:
                t = reader.get(e.name)
                stacked[e.expert].copy_(t.t() if e.transpose else t)
            return stacked
        return make

    tensors = [OutTensor(key, shapes[key], reader.dtype(by_key[key][0].name), producer(key)) for key in shapes if key in by_key]
    absent = [key for key in shapes if key not in by_key]
    if absent:
        raise UserError(f"the {fmt} layout has no tensor for Gigafactory parameter {absent[0]}; this config cannot be imported")
    tokenizer = src / "tokenizer.json"
    with output_dir(out_dir) as out:
        return write_gigafactory_checkpoint(out, cfg, tensors, tokenizer if tokenizer.is_file() else None, progress, f"importing {fmt}")

