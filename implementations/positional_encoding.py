"""Absolute positional encodings in PyTorch: sinusoidal and learned. Spec: spec/positional_encoding.py."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEmbedding"]


def check_sizes(*, d_model: int, max_len: int) -> None:
    if d_model <= 0 or max_len <= 0:
        raise ValueError(f"sizes must be positive: d_model={d_model}, max_len={max_len}")


def check_window(offset: int, s: int, max_len: int) -> None:
    """Positions offset .. offset + s - 1 must lie in 0 .. max_len - 1 (slicing alone would return fewer rows)."""
    if offset < 0 or offset + s > max_len:
        raise ValueError(
            f"positions {offset} .. {offset + s - 1} (offset={offset}, s={s}) are outside "
            f"0 .. {max_len - 1} (max_len={max_len})"
        )


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """(max_len, d) float64: sin(p * theta_i) in column 2i, cos(p * theta_i) in column 2i + 1."""
    position = torch.arange(max_len, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # 2i / d
    angle = torch.outer(position, theta)  # (max_len, d/2)
    return rearrange(torch.stack([angle.sin(), angle.cos()]), "two p i -> p (i two)")


class SinusoidalPositionalEncoding(nn.Module):
    """x + PE[offset : offset + s]; PE is the original transformer's fixed sin/cos table (a buffer)."""

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        check_sizes(d_model=d_model, max_len=max_len)
        if d_model % 2:
            raise ValueError(f"d_model={d_model} must be even: columns 2i and 2i + 1 hold one sin/cos pair")
        self.d_model, self.max_len = d_model, max_len
        # float64 until the module is moved: a table built in float32 and cast up keeps 7 digits only.
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        s = x.shape[-2]
        check_window(offset, s, self.max_len)
        return x + self.pe[offset : offset + s].to(dtype=x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """x + weight[offset : offset + s], a learned (max_len, d) table initialised N(0, 1) like nn.Embedding."""

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        check_sizes(d_model=d_model, max_len=max_len)
        self.d_model, self.max_len = d_model, max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model))

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        s = x.shape[-2]
        check_window(offset, s, self.max_len)
        return x + self.weight[offset : offset + s].to(dtype=x.dtype)
