"""PyTorch's normalization layers under the spec's names: ``nn.LayerNorm`` and ``nn.RMSNorm``.

Conventions converted here (and only here):
* Constructors take the spec's keywords (``d_model``, ``eps``, LayerNorm's ``bias``) and pass eps
  explicitly: ``nn.RMSNorm``'s default ``eps=None`` would mean ``finfo(dtype).eps``, not the spec's 1e-6.
* Half precision: the spec computes norms of float16/bfloat16 inputs in float32 and casts back. Whether
  ``nn.RMSNorm`` does so has depended on the torch version and backend (pytorch PR #133085), so
  ``RMSNorm`` here runs ``F.rms_norm`` on float32 copies of x and the weight for half inputs and casts
  the result back (torch 2.11 on CUDA and 2.13 on the CPU already compute it in float32, so there the
  wrapper changes nothing; older versions need it). This is the one place the adapter adds arithmetic;
  float32 and float64 go to torch untouched. ``nn.LayerNorm`` accumulates in float32 for half inputs on its own and is not wrapped.
The canonical names ("weight", "bias") are nn.LayerNorm's and nn.RMSNorm's own, so no mapping is needed.
``RMSNorm`` is exported only when the installed torch has ``nn.RMSNorm`` (2.4 and later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_RMS_NORM = hasattr(nn, "RMSNorm")
LOW_PRECISION = (torch.float16, torch.bfloat16)

__all__ = ["LayerNorm"] + (["RMSNorm"] if HAS_RMS_NORM else [])


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(d_model, eps=eps, bias=bias)``: elementwise affine with weight (and bias), last axis only."""

    def __init__(self, *, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(d_model, eps=eps, bias=bias)


if HAS_RMS_NORM:

    class RMSNorm(nn.RMSNorm):
        """``nn.RMSNorm(d_model, eps=eps)`` with eps explicit; half inputs are normalised in float32."""

        def __init__(self, *, d_model: int, eps: float = 1e-6) -> None:
            super().__init__(d_model, eps=eps)

        def forward(self, x: Tensor) -> Tensor:
            if x.dtype in LOW_PRECISION:
                weight = None if self.weight is None else self.weight.float()
                return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
            return super().forward(x)
