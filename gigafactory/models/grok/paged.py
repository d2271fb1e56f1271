"""Paged attention for serving: keys/values live in fixed-size blocks of one pool per layer, and a sequence reaches
its own through a block table, so sequences of any length share one memory and identical prompt blocks are stored once.

One forward runs a step's tokens of several sequences flattened into a single row [1, T]: every projection, norm and
expert runs once over all of them; only attention is split into segments (all decode tokens as one batch of rows
with one query each, then each prompt chunk), each gathering its keys through its block tables. Shapes: T step
tokens, R rows of a segment, S queries per row, K gathered key positions, G kv heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gigafactory.models.config import ModelConfig


@dataclass
class BlockPool:
    """Per-layer key/value pools [n_blocks * block_size, G, Dh]: position p of a sequence lives at pool row
    table[p // block_size] * block_size + p % block_size."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, cfg: ModelConfig, n_blocks: int, block_size: int, device=None, dtype=torch.float32) -> "BlockPool":
        shape = (n_blocks * block_size, cfg.n_kv_heads, cfg.resolved_head_dim)
        make = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return cls([make() for _ in range(cfg.n_layers)], [make() for _ in range(cfg.n_layers)], block_size)


@dataclass
class Segment:
    """Tokens [start, start + R*S) of the step, as R rows of S queries; row r attends to its block table unrolled to
    K positions where key position <= its query's position (mask [R, S, K]). `key_index` [R*G*K] picks those keys
    from a layer pool seen as [pool rows * G, Dh], so one index_select gives them as [R, G, K, Dh], contiguous."""

    start: int
    rows: int
    queries: int
    keys: int
    key_index: torch.Tensor
    mask_RSK: torch.Tensor

    @classmethod
    def build(cls, start: int, tables: list[list[int]], positions: list[list[int]], block_size: int, n_kv_heads: int,
              device) -> "Segment":
        """`tables`: each row's block table (any length; shorter ones are padded with block 0, masked out);
        `positions`: each row's query positions (all rows the same count)."""
        n_blocks = max(len(t) for t in tables)
        table_RN = torch.tensor([t + [0] * (n_blocks - len(t)) for t in tables], dtype=torch.long)
        key_rows_RK = (table_RN[:, :, None] * block_size + torch.arange(block_size)).flatten(1)
        index_RGK = key_rows_RK[:, None, :] * n_kv_heads + torch.arange(n_kv_heads)[None, :, None]
        pos_RS = torch.tensor(positions, dtype=torch.long)
        mask = torch.arange(n_blocks * block_size)[None, None, :] <= pos_RS[:, :, None]
        return cls(start, len(tables), len(positions[0]), n_blocks * block_size, index_RGK.flatten().to(device),
                   mask.to(device))


@dataclass
class PagedStep:
    """What one forward over the block pool needs: where each token's key/value is written (pool rows [T]), the
    attention segments in token order, and which tokens' logits to return (None: all)."""

    pool: BlockPool
    write_rows_T: torch.Tensor
    segments: list[Segment]
    logit_rows: torch.Tensor | None = None

    def layer(self, i: int) -> "PagedLayer":
        return PagedLayer(self.pool.k[i], self.pool.v[i], self)


@dataclass
class PagedLayer:
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    step: PagedStep

    def attend(self, q_1HTD: torch.Tensor, k_1GTD: torch.Tensor, v_1GTD: torch.Tensor,
               masked_attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Write this step's keys/values into the pool, then attend segment by segment: [1, H, T, Dh].
        `masked_attention(q [R,H,S,Dh], k [R,G,K,Dh], v, mask [R,S,K])` is the model's own attention math."""
        rows = self.step.write_rows_T
        self.k_pool.index_copy_(0, rows, k_1GTD[0].transpose(0, 1).to(self.k_pool.dtype))
        self.v_pool.index_copy_(0, rows, v_1GTD[0].transpose(0, 1).to(self.v_pool.dtype))
        H, G, Dh = q_1HTD.shape[1], self.k_pool.shape[1], q_1HTD.shape[3]
        k_flat, v_flat = self.k_pool.view(-1, Dh), self.v_pool.view(-1, Dh)
        outs = []
        for seg in self.step.segments:
            n = seg.rows * seg.queries
            q = q_1HTD[0, :, seg.start:seg.start + n].reshape(H, seg.rows, seg.queries, Dh).transpose(0, 1).contiguous()
            k = k_flat.index_select(0, seg.key_index).view(seg.rows, G, seg.keys, Dh).to(q.dtype)
            v = v_flat.index_select(0, seg.key_index).view(seg.rows, G, seg.keys, Dh).to(q.dtype)
            out = masked_attention(q, k, v, seg.mask_RSK)  # [R, H, S, Dh]
            outs.append(out.transpose(0, 1).reshape(H, n, Dh))
        return torch.cat(outs, dim=1)[None] if len(outs) > 1 else outs[0][None]
