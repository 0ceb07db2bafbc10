"""The paged KV cache and attention over it in PyTorch. Spec: spec/paged_kv_cache.py."""

from __future__ import annotations

from typing import Hashable

import torch
from einops import rearrange
from torch import Tensor

from implementations.sdpa import scaled_dot_product_attention

__all__ = ["PagedKVCache", "paged_attention"]


class PagedKVCache:
    """A pool of ``num_blocks`` blocks of ``block_size`` positions, (nb, g, pb, e) for keys and for values,
    shared by sequences: each sequence owns the blocks its block table lists, in logical order."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_blocks, block_size, n_kv_head, head_dim) <= 0:
            raise ValueError(
                f"sizes must be positive: num_blocks={num_blocks}, block_size={block_size}, "
                f"n_kv_head={n_kv_head}, head_dim={head_dim}"
            )
        shape = (num_blocks, n_kv_head, block_size, head_dim)
        self.key_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.value_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._known(seq_id))

    def length(self, seq_id: Hashable) -> int:
        self._known(seq_id)
        return self.lengths[seq_id]

    def append(self, seq_id: Hashable, k: Tensor, v: Tensor) -> None:
        """Write k, v (g, n, e) at the sequence's next n positions, taking the blocks it needs first."""
        _, g, pb, e = self.key_blocks.shape
        n = k.shape[-2]
        if k.shape != (g, n, e) or v.shape != k.shape:
            raise ValueError(f"blocks hold (g, ·, e) = ({g}, ·, {e}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
        table = self.tables.get(seq_id, [])
        start = self.lengths.get(seq_id, 0)
        need = -(-(start + n) // pb) - len(table)
        if need > len(self.free_blocks):  # all or nothing: no block is taken before this check
            raise ValueError(
                f"out of KV cache blocks: sequence {seq_id!r} needs {need} more block(s) of {pb} positions for "
                f"{n} new position(s), and {len(self.free_blocks)} of {self.key_blocks.shape[0]} are free"
            )
        table = table + [self.free_blocks.pop() for _ in range(need)]
        positions = torch.arange(start, start + n, device=k.device)
        blocks = torch.tensor(table, device=k.device)[positions // pb]
        # Advanced indices on axes 0 and 2 address (n, g, e): position x at offset x % pb of block table[x // pb].
        self.key_blocks[blocks, :, positions % pb] = rearrange(k, "g n e -> n g e")
        self.value_blocks[blocks, :, positions % pb] = rearrange(v, "g n e -> n g e")
        self.tables[seq_id], self.lengths[seq_id] = table, start + n

    def free(self, seq_id: Hashable) -> None:
        """Return the sequence's blocks to the free list (their contents stay: stale, never read again)."""
        self.free_blocks.extend(self._known(seq_id))
        del self.tables[seq_id], self.lengths[seq_id]

    def batch(self, seq_ids: list[Hashable]) -> tuple[Tensor, Tensor]:
        """(block_tables (b, mb), lengths (b,)) for paged_attention; short tables padded with block 0."""
        width = max(len(self._known(i)) for i in seq_ids)
        tables = [self.tables[i] + [0] * (width - len(self.tables[i])) for i in seq_ids]
        device = self.key_blocks.device
        return (torch.tensor(tables, dtype=torch.int64, device=device),
                torch.tensor([self.lengths[i] for i in seq_ids], dtype=torch.int64, device=device))

    def _known(self, seq_id: Hashable) -> list[int]:
        if seq_id not in self.tables:
            raise KeyError(f"no sequence {seq_id!r} in this cache (live: {sorted(map(repr, self.tables))})")
        return self.tables[seq_id]


def paged_attention(q: Tensor, key_blocks: Tensor, value_blocks: Tensor, block_tables: Tensor, lengths: Tensor) -> Tensor:
    """Each sequence's last s queries q (b, h, s, e) attend, causally, over its positions 0 .. lengths[i] - 1,
    read from key_blocks, value_blocks (nb, g, pb, e) through its row of block_tables (b, mb)."""
    b, h, s, e = q.shape
    pb = key_blocks.shape[2]
    block_tables = torch.as_tensor(block_tables, dtype=torch.int64, device=q.device)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=q.device)
    t = block_tables.shape[1] * pb
    if bool((lengths < s).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths {lengths.tolist()} must lie in s .. mb * pb = {s} .. {t}")
    # Every sequence's blocks in logical order (the table, never the logical index): (b, g, mb * pb, e).
    k = rearrange(key_blocks[block_tables], "b mb g pb e -> b g (mb pb) e")
    v = rearrange(value_blocks[block_tables], "b mb g pb e -> b g (mb pb) e")
    position = torch.arange(t, device=q.device)
    held = position < lengths[:, None]  # (b, t): slots that hold the sequence's own positions
    # Stale slots may hold NaN: zero them, since masking scores alone leaves 0 * NaN in weights @ v (vLLM #641).
    k = torch.where(held[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(held[:, None, :, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    query_position = lengths[:, None] - s + torch.arange(s, device=q.device)  # (b, s): the last s positions
    allowed = held[:, None, :] & (position <= query_position[..., None])  # (b, s, t), causal per sequence
    return scaled_dot_product_attention(q, k, v, mask=allowed[:, None])  # (b, h, s, e_v)
