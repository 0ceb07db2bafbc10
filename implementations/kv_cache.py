"""The KV cache in PyTorch. Spec: spec/kv_cache.py."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of earlier positions, (b, g, capacity, e) each, filled from the front."""

    def __init__(
        self,
        *,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(batch_size, n_kv_head, head_dim, capacity) <= 0:
            raise ValueError(
                f"sizes must be positive: batch_size={batch_size}, n_kv_head={n_kv_head}, "
                f"head_dim={head_dim}, capacity={capacity}"
            )
        shape = (batch_size, n_kv_head, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (b, g, n, e) at positions length .. length + n - 1; return all cached (b, g, length, e)."""
        b, g, _, e = self.keys.shape
        n = k.shape[-2]
        if k.shape != (b, g, n, e) or v.shape != k.shape:
            raise ValueError(f"cache holds (b, g, ·, e) = ({b}, {g}, ·, {e}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache capacity exceeded: {self.length} cached + {n} new > capacity {self.capacity}"
            )
        # Slice assignment is differentiable, so a cache also works under autograd.
        self.keys[:, :, self.length : self.length + n] = k
        self.values[:, :, self.length : self.length + n] = v
        self.length += n
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0

    @property
    def numbers_per_token(self) -> int:
        """Keys and values stored per token: 2 * n_kv_head * head_dim."""
        b, g, _, e = self.keys.shape
        return 2 * g * e
