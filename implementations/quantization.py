"""Weight-only int8 quantization (symmetric, per output channel) in PyTorch. Spec: spec/quantization.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["quantize_int8", "dequantize_int8", "Int8Linear"]

QMAX = 127


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (o, i) float -> (q (o, i) int8, scale (o,) in the weight's dtype), scale = max|row| / 127.

    Rounding is to nearest, ties to even (torch.round); an all-zero row gets scale 0 and q 0."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float (out_features, in_features) matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    scale = weight.abs().amax(dim=1) / QMAX  # (o,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row divides 0 by 1, not 0 by 0
    q = torch.round(weight / safe[:, None]).clamp(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """(o, i) int8 and (o,) scales -> the (o, i) float weight they stand for, in the scale's dtype."""
    return q.to(scale.dtype) * scale[:, None]


class Int8Linear(nn.Module):
    """y = x (q * scale)^T + bias, with q stored as int8: a quarter of a float32 weight's bytes.

    Build it from a float layer with ``Int8Linear.from_float(weight, bias)``; the keyword constructor makes a
    zero layer of the given sizes (to load a saved state_dict into)."""

    def __init__(self, *, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if min(in_features, out_features) <= 0:
            raise ValueError(f"sizes must be positive: in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """Quantize a float layer's weight (o, i) per output channel; keep its bias (o,) in float."""
        out_features, in_features = weight.shape
        layer = cls(in_features=in_features, out_features=out_features, bias=bias is not None, dtype=weight.dtype,
                    device=weight.device)
        q, scale = quantize_int8(weight.detach())
        layer.weight_int8.copy_(q)
        layer.scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        # The int8 weight is widened to x's dtype on the fly; the scale multiplies the integer-weight sums.
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)  # (..., o)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
