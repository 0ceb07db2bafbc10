"""Multi-query and grouped-query attention in PyTorch. Spec: spec/grouped_query_attention.py."""

from __future__ import annotations

from torch import Tensor, nn

from implementations.attention import ProjectedAttention
from implementations.kv_cache import KVCache

__all__ = ["GroupedQueryAttention", "MultiQueryAttention"]


class GroupedQueryAttention(ProjectedAttention):
    """n_kv_head key/value heads shared by contiguous groups of n_head // n_kv_head query heads."""

    def __init__(
        self, *, d_model: int, n_head: int, n_kv_head: int, rotary: nn.Module | None = None, bias: bool = True
    ) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, rotary=rotary, bias=bias)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False, cache: KVCache | None = None
    ) -> Tensor:
        return self.attend(x, x, mask=mask, causal=causal, cache=cache)


class MultiQueryAttention(GroupedQueryAttention):
    """One key/value head shared by every query head."""

    def __init__(self, *, d_model: int, n_head: int, rotary: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=1, rotary=rotary, bias=bias)
