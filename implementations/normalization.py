"""LayerNorm and RMSNorm in PyTorch. Spec: spec/normalization.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LayerNorm", "RMSNorm"]

# Half-precision inputs are normalised in float32 and cast back once (spec: "Precision").
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check(d_model: int, eps: float, name: str) -> None:
    if d_model <= 0:
        raise ValueError(f"{name}: d_model must be positive, got d_model={d_model}")
    if eps < 0:
        raise ValueError(f"{name}: eps must be >= 0, got eps={eps}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(biased var + eps) * weight + bias, over the last axis of x (..., d).
    ``bias=False`` leaves the bias out (``self.bias`` is None), as ``nn.LayerNorm(bias=False)``."""

    def __init__(self, *, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        _check(d_model, eps, "LayerNorm")
        if not isinstance(bias, bool):
            raise ValueError(f"LayerNorm: bias must be True or False, got bias={bias!r}")
        self.d_model, self.eps = d_model, eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        h = x.to(dtype)
        centred = h - h.mean(dim=-1, keepdim=True)
        var = centred.pow(2).mean(dim=-1, keepdim=True)  # biased: divide by d
        out = centred * torch.rsqrt(var + self.eps) * self.weight.to(dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis of x (..., d); no mean, no bias."""

    def __init__(self, *, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        _check(d_model, eps, "RMSNorm")
        self.d_model, self.eps = d_model, eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        h = x.to(dtype)
        out = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(dtype)
        return out.to(x.dtype)
