"""Our clean-room PyTorch implementations, exported under the spec's component names.

``pytest --impl implementations`` is the same as the default run's "ours".
"""

from implementations.attention import CrossAttention, MultiHeadAttention, SelfAttention
from implementations.grouped_query_attention import GroupedQueryAttention, MultiQueryAttention
from implementations.scaled_dot_product_attention import scaled_dot_product_attention

__all__ = [
    "CrossAttention",
    "GroupedQueryAttention",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "SelfAttention",
    "scaled_dot_product_attention",
]
