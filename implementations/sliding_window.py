"""Sliding-window attention and its rolling KV cache in PyTorch. Spec: spec/sliding_window.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implementations.grouped_query_attention import GroupedQueryAttention
from implementations.sdpa import causal_mask

__all__ = ["sliding_window_mask", "RollingKVCache", "SlidingWindowAttention"]


def sliding_window_mask(s: int, t: int, *, window: int, device: torch.device | str | None = None) -> Tensor:
    """(s, t), True = may attend: query x (at position x + t - s) sees the w keys x + t - s - w < y <= x + t - s."""
    if window < 1:
        raise ValueError(f"window={window} must be at least 1")
    recent = torch.ones(s, t, dtype=torch.bool, device=device).triu(diagonal=t - s - window + 1)
    return causal_mask(s, t, device=device) & recent


class RollingKVCache:
    """The keys and values of the last ``window`` positions, (b, g, w, e) each; position p lives in slot p % w.

    Mistral's rotating buffer: memory stays w positions however long the sequence grows.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(batch_size, n_kv_head, head_dim, window) <= 0:
            raise ValueError(
                f"sizes must be positive: batch_size={batch_size}, n_kv_head={n_kv_head}, "
                f"head_dim={head_dim}, window={window}"
            )
        shape = (batch_size, n_kv_head, window, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.window = window
        self.length = 0  # positions seen: the absolute position of the next token

    @property
    def held(self) -> int:
        """How many positions the cache holds: the last min(length, window)."""
        return min(self.length, self.window)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Return the held positions (oldest first) followed by k, v (b, g, n, e); then keep the last w."""
        b, g, w, e = self.keys.shape
        n = k.shape[-2]
        if k.shape != (b, g, n, e) or v.shape != k.shape:
            raise ValueError(f"cache holds (b, g, ·, e) = ({b}, {g}, ·, {e}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
        start = self.length
        slots = torch.arange(start - self.held, start, device=k.device) % w  # held positions, oldest first
        k_win = torch.cat([self.keys[:, :, slots], k], dim=2)  # (b, g, held + n, e): positions max(0, L-w) .. L+n-1
        v_win = torch.cat([self.values[:, :, slots], v], dim=2)
        # Read before writing: a chunk longer than w needs its own keys the cache will not keep.
        kept = min(n, w)
        new_slots = torch.arange(start + n - kept, start + n, device=k.device) % w  # distinct: kept <= w
        self.keys[:, :, new_slots] = k[:, :, n - kept :]
        self.values[:, :, new_slots] = v[:, :, n - kept :]
        self.length = start + n
        return k_win, v_win

    def reset(self) -> None:
        self.length = 0


class SlidingWindowAttention(GroupedQueryAttention):
    """Causal grouped-query attention in which each query sees its last ``window`` positions (itself included)."""

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        window: int,
        rotary: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, rotary=rotary, bias=bias)
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self.window = window

    def forward(self, x: Tensor, *, cache: RollingKVCache | None = None) -> Tensor:
        s = x.shape[1]
        held = 0
        if cache is not None:
            if getattr(cache, "window", self.window) != self.window:
                raise ValueError(f"the cache holds window={cache.window} positions, this attention window={self.window}")
            held = min(cache.length, self.window)
        # The cache returns positions max(0, L - w) .. L + s - 1, so the band aligns bottom-right (spec).
        mask = sliding_window_mask(s, held + s, window=self.window, device=x.device)
        return self.attend(x, x, mask=mask, causal=False, cache=cache)
