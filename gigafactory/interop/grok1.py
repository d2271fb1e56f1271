"""Read xAI's released Grok-1 checkpoint (github.com/xai-org/grok-1, `ckpt-0/`) one tensor at a time.

Layout (docs/interop.md, /work/shared/reference/grok1-architecture.md §3):
- one plain pickle per parameter, `tensor{i:05d}_000`, i = the position of the parameter in jax.tree_util's flattening
  of the haiku params dict `{module_path: {param: array}}`, whose keys are sorted as strings (layer 10 before layer 2);
- each file holds a numpy array or a `QuantizedWeight8bit(weight=int8, scales=...)`, pickled as
  `__main__.QuantizedWeight8bit`; W = weight.astype(scales.dtype) * scales (scales broadcast per output channel, or
  per block of rows when scales.shape[-2] divides the input dimension);
- matrices are stored [in, out] (y = x W); MoE weights stack the experts on axis 0.

Unpickling is restricted to numpy arrays, numpy dtypes (bfloat16 from ml_dtypes included) and the quantised record:
anything else (os.system, builtins.eval, ...) is refused before it is called.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gigafactory.errors import UserError
from gigafactory.models.config import ModelConfig

# The 12 parameters of one decoder layer: (haiku module path under decoder_layer_N, param) -> Gigafactory name.
# `transpose` turns JAX [in, out] into nn.Linear's [out, in]; the experts stay [E, in, out] (Gigafactory's layout).
LAYER_PARAMS: dict[tuple[str, str], tuple[str, bool]] = {
    ("moe/linear", "w"): ("moe.experts.w_gate", False),  # [E, D, F]
    ("moe/linear_1", "w"): ("moe.experts.w_down", False),  # [E, F, D]
    ("moe/linear_v", "w"): ("moe.experts.w_up", False),  # [E, D, F]
    ("multi_head_attention/key", "w"): ("attn.wk.weight", True),  # [D, G*Dh]
    ("multi_head_attention/linear", "w"): ("attn.wo.weight", True),  # [H*Dh, D]
    ("multi_head_attention/query", "w"): ("attn.wq.weight", True),  # [D, H*Dh]
    ("multi_head_attention/value", "w"): ("attn.wv.weight", True),  # [D, G*Dh]
    ("rms_norm", "scale"): ("pre_attn_norm.weight", False),
    ("rms_norm_1", "scale"): ("post_attn_norm.weight", False),
    ("rms_norm_2", "scale"): ("pre_moe_norm.weight", False),
    ("rms_norm_3", "scale"): ("post_moe_norm.weight", False),
    ("router", "w"): ("moe.router.weight", True),  # [D, E]
}
TOP_PARAMS: dict[tuple[str, str], tuple[str, bool]] = {
    ("language_model/in_out_embed", "embeddings"): ("embed.weight", False),  # [V, D]
    ("language_model/rms_norm", "scale"): ("norm.weight", False),
}


@dataclass(frozen=True)
class Grok1Param:
    index: int  # file tensor{index:05d}_000
    jax_name: str  # "transformer/decoder_layer_0/moe/linear:w"
    key: str  # Gigafactory parameter name
    transpose: bool

    @property
    def file_name(self) -> str:
        return f"tensor{self.index:05d}_000"


def grok1_params(n_layers: int) -> list[Grok1Param]:
    """Every parameter of a Grok-1 checkpoint with `n_layers` layers, in file order (jax-flatten order)."""
    tree: dict[str, dict[str, tuple[str, bool]]] = {}
    for (module, param), target in TOP_PARAMS.items():
        tree.setdefault(module, {})[param] = target
    for layer in range(n_layers):
        for (module, param), (key, transpose) in LAYER_PARAMS.items():
            tree.setdefault(f"transformer/decoder_layer_{layer}/{module}", {})[param] = (f"layers.{layer}.{key}", transpose)
    out = []
    for module in sorted(tree):  # jax.tree_util flattens dicts in sorted-key order, level by level
        for param in sorted(tree[module]):
            key, transpose = tree[module][param]
            out.append(Grok1Param(len(out), f"{module}:{param}", key, transpose))
    return out


class QuantizedWeight8bit:
    """Stand-in for xai-org/grok-1 checkpoint.py's dataclass: int8 `weight` and its `scales` (numpy arrays only)."""

    def __init__(self, weight: np.ndarray | None = None, scales: np.ndarray | None = None):
        self.weight, self.scales = weight, scales

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:  # (None, slots) form
            state = state[1]
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError("QuantizedWeight8bit state must be exactly {weight, scales}")
        if not all(isinstance(v, np.ndarray) for v in state.values()):
            raise pickle.UnpicklingError("QuantizedWeight8bit fields must be numpy arrays")
        self.weight, self.scales = state["weight"], state["scales"]


def _bfloat16_type():
    """ml_dtypes' bfloat16 when installed; otherwise numpy uint16, reinterpreted as bf16 bits afterwards."""
    try:
        import ml_dtypes

        return ml_dtypes.bfloat16
    except ImportError:
        return np.uint16


_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct


def _empty_reconstruct(cls, shape, dtype):
    """numpy's pickles always start an array as `_reconstruct(ndarray, (0,), b'b')` and fill it from the pickled
    bytes (whose length numpy checks against the declared shape); any other shape would allocate memory the file
    does not hold (a 93-byte pickle can declare a 1 TiB array), so it is refused before anything is allocated."""
    if cls is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"array reconstruction with shape {shape!r} refused (numpy pickles start from shape (0,))")
    return _RECONSTRUCT(cls, shape, dtype)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _empty_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _empty_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("ml_dtypes", "bfloat16"): _bfloat16_type,
    ("__main__", "QuantizedWeight8bit"): lambda: QuantizedWeight8bit,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # raw bytes in protocol-2 pickles
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a Grok-1 tensor file needs; any other global is refused before it is called."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays and QuantizedWeight8bit are allowed)")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_load(data: bytes | io.BufferedIOBase):
    """Unpickle with RestrictedUnpickler; returns a numpy array or a QuantizedWeight8bit."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    obj = RestrictedUnpickler(stream).load()
    arrays = [obj] if isinstance(obj, np.ndarray) else [obj.weight, obj.scales] if isinstance(obj, QuantizedWeight8bit) else None
    if arrays is None:
        raise pickle.UnpicklingError(f"expected a numpy array or QuantizedWeight8bit, got {type(obj).__name__}")
    if any(a is None or a.dtype.hasobject for a in arrays):
        raise pickle.UnpicklingError("object arrays are not allowed")
    return obj


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch without a copy; bf16 (ml_dtypes, or the uint16 stand-in) becomes torch.bfloat16."""
    if array.dtype.name == "bfloat16" or array.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def dequantize(q: QuantizedWeight8bit, dtype: torch.dtype) -> torch.Tensor:
    """W = weight.astype(scales.dtype) * scales, in place on one buffer, then cast to `dtype`.

    Scales broadcast against the weight ([..., 1, out] per output channel); when scales.shape[-2] = n > 1 divides the
    input dimension, row block b of the weight uses scales[..., b, :] (8 row blocks for row-parallel matrices)."""
    scales = to_torch(q.scales)
    weight = torch.from_numpy(q.weight)
    if weight.dtype != torch.int8:
        raise ValueError(f"quantised weight has dtype {weight.dtype}, expected int8")
    if not scales.is_floating_point():
        raise ValueError(f"scales have dtype {scales.dtype}, expected a float type")
    shape, sshape = tuple(weight.shape), tuple(scales.shape)  # checked before the full-size buffer is allocated
    rows, blocks = (shape[-2], sshape[-2]) if len(shape) >= 2 and len(sshape) == len(shape) else (0, 0)
    fits = (rows and blocks and (blocks in (1, rows) or rows % blocks == 0) and sshape[-1] in (1, shape[-1])
            and all(s in (1, w) for s, w in zip(sshape[:-2], shape[:-2])))
    if not fits:
        raise ValueError(f"scales of shape {sshape} do not fit a weight of shape {shape}")
    out = weight.to(scales.dtype)  # the only full-size buffer besides the int8 source
    del weight
    if blocks not in (1, rows):
        view = out.view(*out.shape[:-2], blocks, rows // blocks, out.shape[-1])
        view.mul_(scales.unsqueeze(-2))
    else:
        out.mul_(scales)
    return out.to(dtype)


class Grok1Checkpoint:
    """Lazy reader of a released Grok-1 directory: `load(param)` reads, checks and converts one file."""

    def __init__(self, directory: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
        self.dir = Path(directory).expanduser()
        if not self.dir.is_dir():
            raise UserError(f"Grok-1 checkpoint directory '{self.dir}' not found; pass the ckpt-0/ directory of the download with --from")
        found = sorted(p.name for p in self.dir.glob("tensor*_*"))
        if not found and (self.dir / "ckpt-0").is_dir():
            self.dir = self.dir / "ckpt-0"
            found = sorted(p.name for p in self.dir.glob("tensor*_*"))
        self.params = grok1_params(cfg.n_layers)
        self.cfg, self.dtype = cfg, dtype
        if len(found) != len(self.params):
            raise UserError(
                f"'{self.dir}' holds {len(found)} tensor files; a {cfg.n_layers}-layer Grok-1 checkpoint has {len(self.params)} "
                f"(2 + 12 per layer); pass the complete ckpt-0/ directory or the --preset/--model-config matching it"
            )
        missing = [p.file_name for p in self.params if not (self.dir / p.file_name).is_file()]
        if missing:
            raise UserError(f"'{self.dir}' lacks {missing[0]} (and {len(missing) - 1} more); re-download the checkpoint")

    def file_bytes(self) -> int:
        return sum((self.dir / p.file_name).stat().st_size for p in self.params)

    def load(self, param: Grok1Param, expected_shape: tuple[int, ...]) -> torch.Tensor:
        """One parameter as a torch tensor in Gigafactory's layout; quantised weights are dequantised to `dtype`.

        Sizes are checked before anything big is allocated: the file against what the expected shape can occupy,
        then the unpickled shapes against the layout, before dequantising."""
        path = self.dir / param.file_name
        stored = tuple(reversed(expected_shape)) if param.transpose else tuple(expected_shape)  # JAX [in, out]
        numel = math.prod(stored)
        limit = 8 * numel + 2**16  # int8 weight + scales of at most its size in fp32, or an fp32/bf16 array; + pickle framing
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"Grok-1 tensor file '{path}' ({param.jax_name}) is {size} bytes, more than a tensor of shape {stored} can take "
                            f"({limit}); pass the --preset/--model-config the checkpoint was made with, or re-download that file")
        try:
            with open(path, "rb") as f:
                obj = restricted_load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            reason = "truncated" if isinstance(err, EOFError) or "truncated" in str(err) else str(err).splitlines()[0][:160] or type(err).__name__
            raise UserError(f"Grok-1 tensor file '{path}' ({param.jax_name}) could not be read: {reason}; re-download that file") from None
        declared = tuple(obj.weight.shape) if isinstance(obj, QuantizedWeight8bit) else tuple(obj.shape)
        if declared != stored:
            raise UserError(
                f"Grok-1 tensor file '{path}' ({param.jax_name}) holds shape {declared}, the model config expects {stored} "
                f"(stored [in, out]); pass the --preset/--model-config the checkpoint was made with"
            )
        try:
            tensor = dequantize(obj, self.dtype) if isinstance(obj, QuantizedWeight8bit) else to_torch(obj)
        except ValueError as err:
            raise UserError(f"Grok-1 tensor file '{path}' ({param.jax_name}): {err}; re-download that file") from None
        del obj
        if param.transpose:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(expected_shape):
            raise UserError(
                f"Grok-1 tensor file '{path}' ({param.jax_name}) has shape {tuple(tensor.shape)} after conversion, the model config "
                f"expects {tuple(expected_shape)}; pass the --preset/--model-config the checkpoint was made with"
            )
        return tensor.contiguous()
