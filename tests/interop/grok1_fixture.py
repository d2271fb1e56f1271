"""Writes a synthetic checkpoint in the exact layout of xAI's Grok-1 release, written independently of the importer.

- files `tensor{i:05d}_000`, i = position in jax.tree_util's flattening of {module_path: {param: array}} (keys sorted
  as strings, so decoder_layer_10 comes before decoder_layer_2);
- quantised matrices are `__main__.QuantizedWeight8bit(weight=int8, scales=bf16)` pickles; the bf16 scales pickle
  byte-for-byte like numpy arrays of ml_dtypes.bfloat16 (dtype reduced as `numpy.dtype(ml_dtypes.bfloat16, False,
  True)`), also when ml_dtypes is not installed; the embedding, norms and router are fp32 arrays;
- matrices are [in, out], experts stacked on axis 0; attention `linear` and MoE `linear_1` use 8 row-block scales.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_RECONSTRUCT = np._core.multiarray._reconstruct


@dataclass
class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray


QuantizedWeight8bit.__module__ = "__main__"  # how xai-org/grok-1 pickled it (checkpoint.py runs as __main__)


class _FakeMlDtypes:
    module = types.ModuleType("ml_dtypes")

    class bfloat16:  # noqa: N801 - the name ml_dtypes uses
        pass


_FakeMlDtypes.bfloat16.__module__ = "ml_dtypes"
_FakeMlDtypes.bfloat16.__qualname__ = "bfloat16"
_FakeMlDtypes.module.bfloat16 = _FakeMlDtypes.bfloat16


class _BF16Dtype:
    def __reduce__(self):
        return (np.dtype, (_FakeMlDtypes.bfloat16, False, True), (3, "<", None, None, None, 2, 2, 64))


class BF16Array:
    """bf16 values held as uint16 bits; pickles as numpy does an ml_dtypes.bfloat16 array."""

    def __init__(self, values: torch.Tensor):
        self.bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def __reduce__(self):
        return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, self.bits.shape, _BF16Dtype(), False, self.bits.tobytes()))

    def to_float(self) -> torch.Tensor:
        return torch.from_numpy(self.bits.copy()).view(torch.bfloat16).float()


@contextlib.contextmanager
def grok1_pickling():
    """Register __main__.QuantizedWeight8bit and the fake ml_dtypes module only while pickling."""
    main = sys.modules["__main__"]
    had_qw, old_qw = hasattr(main, "QuantizedWeight8bit"), getattr(main, "QuantizedWeight8bit", None)
    old_ml = sys.modules.get("ml_dtypes")
    main.QuantizedWeight8bit = QuantizedWeight8bit
    sys.modules["ml_dtypes"] = _FakeMlDtypes.module
    try:
        yield
    finally:
        if had_qw:
            main.QuantizedWeight8bit = old_qw
        else:
            del main.QuantizedWeight8bit
        if old_ml is None:
            del sys.modules["ml_dtypes"]
        else:
            sys.modules["ml_dtypes"] = old_ml


def jax_names(n_layers: int) -> list[str]:
    """File order of the release: module paths sorted as strings, then param names."""
    modules = {"language_model/in_out_embed": ["embeddings"], "language_model/rms_norm": ["scale"]}
    layer = ["moe/linear", "moe/linear_1", "moe/linear_v", "multi_head_attention/key", "multi_head_attention/linear",
             "multi_head_attention/query", "multi_head_attention/value", "rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3", "router"]
    for i in range(n_layers):
        for m in layer:
            modules[f"transformer/decoder_layer_{i}/{m}"] = ["scale" if "rms_norm" in m else "w"]
    return [f"{m}:{p}" for m in sorted(modules) for p in modules[m]]


def _quantize(w: torch.Tensor, row_blocks: int) -> QuantizedWeight8bit:
    """int8 weight and bf16 scales of shape [..., row_blocks, out] (1 = per output channel)."""
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    scales = (blocks.abs().amax(dim=-2) / 127.0).clamp_min(1e-8)  # [..., row_blocks, out]
    scales = scales.to(torch.bfloat16).float()
    q = (blocks / scales.unsqueeze(-2)).round().clamp(-127, 127).to(torch.int8).reshape(w.shape)
    return QuantizedWeight8bit(q.numpy(), BF16Array(scales))


def make_grok1_params(d: dict, seed: int = 0) -> dict[str, object]:
    """Random parameters {jax name: np.ndarray | QuantizedWeight8bit} for dims d (keys V, D, L, H, G, Dh, E, F)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.05: torch.randn(*shape, generator=g) * std  # noqa: E731
    V, D, H, G, Dh, E, Fw = d["V"], d["D"], d["H"], d["G"], d["Dh"], d["E"], d["F"]
    params = {"language_model/in_out_embed:embeddings": rnd(V, D, std=0.5).numpy(),
              "language_model/rms_norm:scale": (1 + rnd(D, std=0.1)).numpy()}
    for i in range(d["L"]):
        p = f"transformer/decoder_layer_{i}/"
        params[p + "moe/linear:w"] = _quantize(rnd(E, D, Fw), 1)
        params[p + "moe/linear_v:w"] = _quantize(rnd(E, D, Fw), 1)
        params[p + "moe/linear_1:w"] = _quantize(rnd(E, Fw, D), 8)
        params[p + "multi_head_attention/query:w"] = _quantize(rnd(D, H * Dh, std=0.2), 1)
        params[p + "multi_head_attention/key:w"] = _quantize(rnd(D, G * Dh, std=0.2), 1)
        params[p + "multi_head_attention/value:w"] = _quantize(rnd(D, G * Dh), 1)
        params[p + "multi_head_attention/linear:w"] = _quantize(rnd(H * Dh, D), 8)
        for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            params[p + n + ":scale"] = (1 + rnd(D, std=0.1)).numpy()
        params[p + "router:w"] = rnd(D, E, std=0.5).numpy()
    return params


def write_grok1_checkpoint(directory, params: dict[str, object], n_layers: int) -> list[str]:
    """One pickle per parameter, tensor{i:05d}_000 in release order; returns the names in file order."""
    directory.mkdir(parents=True, exist_ok=True)
    names = jax_names(n_layers)
    with grok1_pickling():
        for i, name in enumerate(names):
            with open(directory / f"tensor{i:05d}_000", "wb") as f:
                pickle.dump(params[name], f)
    return names


def dequant_reference(value) -> torch.Tensor:
    """JAX semantics: weight.astype(bf16) * scales (bf16 product), block by block for row-block scales; fp32 out."""
    if not isinstance(value, QuantizedWeight8bit):
        return torch.from_numpy(np.array(value)).float()
    w = torch.from_numpy(value.weight).float()
    s = value.scales.to_float()
    rows, blocks = w.shape[-2], s.shape[-2]
    out = torch.empty_like(w)
    for b in range(blocks):
        sl = slice(b * rows // blocks, (b + 1) * rows // blocks)
        out[..., sl, :] = (w[..., sl, :] * s[..., b : b + 1, :]).to(torch.bfloat16).float()
    return out


def _rms(x, scale, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * scale


def reference_logits(params: dict, d: dict, tokens: torch.Tensor, emb_mult: float, out_mult: float, attn_scale: float) -> torch.Tensor:
    """Grok-1's forward pass (xai-org/grok-1 model.py, §2 of the architecture notes) in fp32 from the JAX tensors."""
    W = {k: dequant_reference(v) for k, v in params.items()}
    H, G, Dh = d["H"], d["G"], d["Dh"]
    S = tokens.shape[0]
    E_in = W["language_model/in_out_embed:embeddings"]
    h = E_in[tokens] * emb_mult  # [S, D]
    pos = torch.arange(S).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2).float() / Dh))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)  # [S, Dh]

    def rope(x):  # x [S, n, Dh], half-split rotation
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
        return x * ang.cos()[:, None] + torch.cat([-x2, x1], -1) * ang.sin()[:, None]

    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    for i in range(d["L"]):
        p = lambda n: W[f"transformer/decoder_layer_{i}/{n}"]  # noqa: E731
        a = _rms(h, p("rms_norm:scale"))
        q = rope((a @ p("multi_head_attention/query:w")).view(S, H, Dh))
        k = rope((a @ p("multi_head_attention/key:w")).view(S, G, Dh))
        v = (a @ p("multi_head_attention/value:w")).view(S, G, Dh)
        out = torch.empty(S, H, Dh)
        for head in range(H):
            kv = head // (H // G)
            s = (q[:, head] @ k[:, kv].T) * attn_scale
            s = 30.0 * torch.tanh(s / 30.0)
            s = s.masked_fill(~causal, float("-inf"))
            out[:, head] = s.softmax(-1) @ v[:, kv]
        h = h + _rms(out.reshape(S, H * Dh) @ p("multi_head_attention/linear:w"), p("rms_norm_1:scale"))
        m = _rms(h, p("rms_norm_2:scale"))
        probs = (m @ p("router:w")).softmax(-1)  # [S, E]
        gates, idx = probs.topk(2, dim=-1)  # raw probabilities, not renormalised
        y = torch.zeros_like(m)
        for t in range(S):
            for j in range(2):
                e = int(idx[t, j])
                hid = F.gelu(m[t] @ p("moe/linear:w")[e], approximate="tanh") * (m[t] @ p("moe/linear_v:w")[e])
                y[t] += gates[t, j] * (hid @ p("moe/linear_1:w")[e])
        h = h + _rms(y, p("rms_norm_3:scale"))
    h = _rms(h, W["language_model/rms_norm:scale"])
    return (h @ E_in.T) * out_mult
