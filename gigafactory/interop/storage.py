"""Streaming tensor I/O: Gigafactory (DCP) checkpoints and sharded safetensors, one tensor in memory at a time.

A conversion is a list of `OutTensor`s (name, shape, dtype, and a function producing the tensor). The writers ask
for each tensor only when they write it and drop it afterwards, so the peak memory is about two tensors (the source
being converted and the converted copy), never the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gigafactory.config.job import JobConfig
from gigafactory.config.loader import config_to_toml, load_config
from gigafactory.errors import UserError
from gigafactory.models.config import ModelConfig
from gigafactory.train.checkpoint import LATEST
from gigafactory.train.checkpoint_files import checkpoint_name, resolve_checkpoint, write_manifest

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int8: "I8", torch.int64: "I64"}
DEFAULT_SHARD_BYTES = 5 * 10**9
MAX_SHARD_BYTES = 10**15  # a bound that keeps `--max-shard-size 1e400` (inf) and friends a one-line error


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class Progress:
    """A rich progress bar over bytes written (or nothing when disabled)."""

    def __init__(self, description: str, total_bytes: int, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
            self._task = self._bar.add_task(description, total=total_bytes)

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes)


def _produce(t: OutTensor) -> torch.Tensor:
    x = t.make().to(t.dtype).contiguous()
    if tuple(x.shape) != tuple(t.shape):
        raise UserError(f"tensor {t.name} has shape {tuple(x.shape)}, expected {tuple(t.shape)}; the source does not match its config")
    return x


# ---- Gigafactory checkpoints ------------------------------------------------------------------------------------
class _LazySavePlanner(DefaultSavePlanner):
    """DCP planner whose state dict holds meta tensors; each tensor is produced when DCP writes it."""

    def __init__(self, producers: dict[str, OutTensor], progress: Progress):
        super().__init__()
        self.producers, self.progress = producers, progress

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn not in self.producers:
            return super().resolve_data(write_item)
        out = self.producers[fqn]
        tensor = _produce(out)
        self.progress.advance(out.nbytes)
        return tensor


def job_config_for(model_cfg: ModelConfig) -> JobConfig:
    """A default job around an imported model (sequence length clipped to the model's context), validated."""
    job = JobConfig(model=model_cfg)
    job.data.seq_len = min(job.data.seq_len, model_cfg.max_seq_len)
    job.validate()
    return job


def write_gigafactory_checkpoint(out_dir: str | Path, model_cfg: ModelConfig, tensors: list[OutTensor], tokenizer_json: Path | None = None,
                                 progress: bool = False, description: str = "writing checkpoint") -> Path:
    """Write `out_dir/checkpoints/step-00000000/` (DCP model state, config.toml, tokenizer.json, manifest.json).

    `out_dir` then works as a run directory for `gigafactory generate --checkpoint` and `load_for_inference`. There is
    no optimizer state. DCP writes one file per tensor, each produced on demand, so memory stays at ~2 tensors."""
    job = job_config_for(model_cfg)  # fail before writing anything
    root = Path(out_dir).expanduser() / "checkpoints"
    final = root / checkpoint_name(0)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"model": {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors}}
    producers = {f"model.{t.name}": t for t in tensors}
    with Progress(description, sum(t.nbytes for t in tensors), progress) as bar:
        writer = FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1, sync_files=False)
        try:
            dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(producers, bar))
        except (Exception, CheckpointException) as err:  # DCP wraps a producer's error (a BaseException)
            shutil.rmtree(tmp, ignore_errors=True)
            raise _unwrap(err) from None
    (tmp / "config.toml").write_text(config_to_toml(job))
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (root / LATEST).write_text(final.name + "\n")
    return final


def _unwrap(err: BaseException) -> BaseException:
    """The UserError a producer raised inside DCP (DCP reports it as CheckpointException.failures), else err."""
    for failure in getattr(err, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, UserError):
            return inner
    return err


class GigafactorySource:
    """A Gigafactory checkpoint read one parameter at a time (any parallel layout it was saved with)."""

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint(path)
        config_file = self.path / "config.toml"
        if not config_file.is_file():
            raise UserError(f"checkpoint '{self.path}' has no config.toml; pass a checkpoint written by `gigafactory train` or `gigafactory import`")
        self.job = load_config(config_path=str(config_file))
        self.cfg: ModelConfig = self.job.model
        meta = FileSystemReader(str(self.path)).read_metadata()
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            fqn[len("model."):]: (tuple(m.size), m.properties.dtype)
            for fqn, m in meta.state_dict_metadata.items()
            if fqn.startswith("model.") and isinstance(m, TensorStorageMetadata)
        }
        tok = self.path / "tokenizer.json"
        self.tokenizer_json = tok if tok.is_file() else None

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise UserError(f"checkpoint '{self.path}' has no parameter {key}; it does not match its own config.toml")
        shape, dtype = self.shapes[key]
        state = {"model": {key: torch.empty(shape, dtype=dtype)}}
        dcp.load(state, checkpoint_id=str(self.path))
        return state["model"][key]


# ---- safetensors --------------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000; '500MB', '2GiB', or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, scale in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, scale = s, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise UserError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes") from None
    if not math.isfinite(value) or value > MAX_SHARD_BYTES:
        raise UserError(f"shard size {text!r} is not a usable size; write at most 1PB, e.g. 5GB")
    if int(value) <= 0:
        raise UserError(f"shard size {text!r} must be at least 1 byte, e.g. 5GB")
    return int(value)


def _plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_safetensors_file(path: Path, tensors: list[OutTensor], bar: Progress) -> None:
    """The safetensors format written by hand: 8-byte header length, JSON header, then each tensor's bytes in order;
    the header is known up front, so tensors are produced and written one at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            x = _produce(t)
            f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
            del x
            bar.advance(t.nbytes)
    tmp.replace(path)


def write_safetensors_shards(out_dir: Path, tensors: list[OutTensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                             progress: bool = False, description: str = "exporting") -> list[Path]:
    """`model-0000i-of-0000N.safetensors` of at most max_shard_bytes each (a bigger tensor gets a shard to itself)
    and `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: file}})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors, max_shard_bytes)
    files, weight_map = [], {}
    with Progress(description, sum(t.nbytes for t in tensors), progress) as bar:
        for i, shard in enumerate(shards):
            path = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors_file(path, shard, bar)
            files.append(path)
            weight_map.update({t.name: path.name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


class SafetensorsSource:
    """Tensors of a directory of safetensors files (an index json, or every *.safetensors), read lazily."""

    def __init__(self, directory: Path):
        self.dir = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                raise UserError(f"'{index}' is not a safetensors index (a JSON object with a \"weight_map\"); "
                                "restore it or delete it to read every *.safetensors file") from None
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"'{directory}' holds no *.safetensors files; pass a directory written by `gigafactory export`")
        self.location: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            if not isinstance(name, str) or not (directory / name).is_file():
                raise UserError(f"'{directory}' lacks {name}, listed in its index; copy the whole export directory")
            try:
                with _open_safetensors(directory / name) as f:
                    for key in f.keys():
                        self.location[key] = name
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
                        self.dtypes[key] = f.get_slice(key).get_dtype()
            except _SAFETENSORS_ERRORS as err:
                raise _damaged(directory / name, err) from None

    def names(self) -> Iterable[str]:
        return self.location.keys()

    def dtype(self, name: str) -> torch.dtype:
        found = {v: k for k, v in _ST_DTYPES.items()}.get(self.dtypes[name].upper())
        if found not in DTYPES.values():
            raise UserError(f"tensor {name} in '{self.dir}' has dtype {self.dtypes[name]}; import reads bf16, fp16 or fp32 weights")
        return found

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise UserError(f"'{self.dir}' has no tensor {name}; the export is incomplete or of another layout")
        try:
            with _open_safetensors(self.dir / self.location[name]) as f:
                return f.get_tensor(name)
        except _SAFETENSORS_ERRORS as err:
            raise _damaged(self.dir / self.location[name], err) from None


def _open_safetensors(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), "pt")


def _safetensors_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError, RuntimeError)


_SAFETENSORS_ERRORS = _safetensors_errors()


def _damaged(path: Path, err: BaseException) -> UserError:
    reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return UserError(f"safetensors file '{path}' is damaged or truncated ({reason}); copy it again from the export")


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """The output directory, created, for the body of a `with`; if the body fails, what it created is removed again
    (the directory itself and any parents made for it, or just its contents when it existed empty), so a failed
    conversion leaves nothing half-written behind.

    Refuses a non-empty directory (nothing is overwritten by accident) and turns an unwritable place into one line;
    writability is checked with a probe file, since root ignores permission bits."""
    if not str(path).strip():
        raise UserError("--out is empty; pass a new or empty directory")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out '{p}' is a file, not a directory; pass a new or empty directory")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"output directory '{p}' exists and is not empty; pass a new or empty directory with --out")
    first_new = next((a for a in [p, *p.parents][::-1] if not a.exists()), None)  # outermost directory we create
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".gigafactory-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        _remove_created(p, first_new)
        raise UserError(f"cannot write to --out '{p}' ({err.strerror or err}); pass a directory you can write to") from None
    try:
        yield p
    except BaseException:
        _remove_created(p, first_new)
        raise


def _remove_created(p: Path, first_new: Path | None) -> None:
    if first_new is not None:
        shutil.rmtree(first_new, ignore_errors=True)
    elif p.is_dir():
        for child in p.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
