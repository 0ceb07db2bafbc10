"""PyTorch under the spec's name ``tiled_attention``: ``F.scaled_dot_product_attention`` for the output and
``torch.logsumexp`` over the masked, scaled scores for the log-sum-exp.

PyTorch has no public attention that returns the log-sum-exp (its flash kernels compute one, behind
private operators), so this adapter is not tiled: it takes no ``block_size`` (the memory property, which
needs one, is skipped for it) and builds the (s, t) scores to take their log-sum-exp. What it checks is
the family's other claims against PyTorch's own numerics: the output for every mask and causal flag, the
lse convention (natural log of the scaled scores; -inf for a row with no allowed key), gradients, fully
masked rows, dtypes. Causal alignment and masks are converted as in adapters/pytorch/attention.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adapters.pytorch.attention import HAS_ENABLE_GQA, _allowed
from adapters.pytorch.attention import scaled_dot_product_attention as torch_sdpa

__all__ = ["tiled_attention"]


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False,
                    scale: float | None = None) -> tuple[Tensor, Tensor]:
    out = torch_sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
    s, t, r = q.shape[-2], k.shape[-2], q.shape[1] // k.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)  # the spec's lse dtype: float32 for half inputs
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.to(work) @ k.repeat_interleave(r, dim=1).to(work).transpose(-2, -1) * scale  # (b, h, s, t)
    allowed = _allowed(mask, causal, s, t, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)  # an all -inf row gives -inf


if not HAS_ENABLE_GQA:  # torch < 2.5: F.scaled_dot_product_attention cannot group query heads
    tiled_attention.spec_options = {"grouped_heads": False}
