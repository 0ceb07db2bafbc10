"""Tiled attention with online softmax (the FlashAttention algorithm), in PyTorch. Spec: spec/tiled_attention.py.

The forward pass walks the keys block by block, keeping per query row the running maximum m, normalizer l
and numerator O; the backward pass recomputes each block's probabilities from the saved log-sum-exp. No
tensor of the (s, t) score matrix's size is ever created: the largest is one (b, g, r, s, block) block.

Query heads are handled in their KV groups, (b, h, s, e) -> (b, g, r, s, e) with r = h // g, so K and V
are read once per KV head instead of being repeated per query head (contiguous groups: query head
j * r + i reads KV head j).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["tiled_attention"]


def block_allowed(mask: Tensor | None, causal: bool, s: int, t: int, start: int, stop: int,
                  device: torch.device) -> Tensor | None:
    """Which (query, key) pairs of keys start .. stop - 1 may attend, broadcastable to (b, g, r, s, block);
    None: all. ``mask`` is the caller's mask already viewed as (b, g, r, s, t)."""
    allowed = None
    if causal:
        # Bottom-right: query x sits at position t - s + x and sees keys y <= x + t - s.
        queries = torch.arange(s, device=device)[:, None]
        keys = torch.arange(start, stop, device=device)[None, :]
        allowed = keys <= queries + (t - s)  # (s, block)
    if mask is not None:
        block = mask[..., start:stop]
        allowed = block if allowed is None else block & allowed
    return allowed


def block_scores(q: Tensor, k_block: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
    """scale * q K_block^T with disallowed pairs at -inf: (b, g, r, s, block)."""
    scores = torch.einsum("bgrse,bgte->bgrst", q, k_block) * scale
    return scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))


class TiledAttention(torch.autograd.Function):
    """Forward: online softmax over key blocks; backward: blocks recomputed from the saved lse."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float,
                block_size: int) -> tuple[Tensor, Tensor]:
        b, h, s, _ = q.shape
        g, t, ev = k.shape[1], k.shape[2], v.shape[-1]
        # float16/bfloat16 inputs are computed in float32 (as the kernels accumulate); float64 stays float64.
        work = torch.promote_types(q.dtype, torch.float32)
        qg = q.to(work).unflatten(1, (g, h // g))  # (b, g, r, s, e)
        grouped_mask = None if mask is None else torch.broadcast_to(mask, (b, h, s, t)).unflatten(1, (g, h // g))
        m = torch.full(qg.shape[:-1], float("-inf"), dtype=work, device=q.device)  # (b, g, r, s)
        l = torch.zeros_like(m)
        o = torch.zeros(*qg.shape[:-1], ev, dtype=work, device=q.device)  # (b, g, r, s, e_v)
        for start in range(0, t, block_size):
            stop = min(start + block_size, t)  # the last block may be shorter
            allowed = block_allowed(grouped_mask, causal, s, t, start, stop, q.device)
            scores = block_scores(qg, k[:, :, start:stop].to(work), scale, allowed)
            m_new = torch.maximum(m, scores.amax(dim=-1))
            # A row with no allowed key so far keeps m = -inf: shift it by 0, so exp(-inf - 0) = 0, not NaN.
            shift = torch.where(torch.isfinite(m_new), m_new, 0.0)
            p = torch.exp(scores - shift[..., None])  # (b, g, r, s, block)
            rescale = torch.exp(m - shift)  # e^(m - m'): the earlier blocks' terms, re-based on the new maximum
            l = rescale * l + p.sum(dim=-1)
            o = rescale[..., None] * o + torch.einsum("bgrst,bgtf->bgrsf", p, v[:, :, start:stop].to(work))
            m = m_new
        empty = l == 0  # no allowed key at all: out 0 and lse -inf (spec), never 0/0
        out = (o / torch.where(empty, 1.0, l)[..., None]).flatten(1, 2).to(q.dtype)  # (b, h, s, e_v)
        lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l))).flatten(1, 2)  # (b, h, s)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out: Tensor, _d_lse: Tensor | None):
        q, k, v, mask, out, lse = ctx.saved_tensors
        b, h, s, _ = q.shape
        g, t = k.shape[1], k.shape[2]
        work = lse.dtype
        qg = q.to(work).unflatten(1, (g, h // g))
        d_out = d_out.to(work).unflatten(1, (g, h // g))  # (b, g, r, s, e_v)
        grouped_mask = None if mask is None else torch.broadcast_to(mask, (b, h, s, t)).unflatten(1, (g, h // g))
        # D = rowsum(dout * out) = sum_y P[x, y] dP[x, y]: the softmax Jacobian's correction term, per row.
        d_row = (d_out * out.to(work).unflatten(1, (g, h // g))).sum(dim=-1)  # (b, g, r, s)
        # exp(S - lse) with lse = +inf for an empty row: its probabilities are 0, never exp(-inf + inf).
        lse = torch.where(torch.isinf(lse), float("inf"), lse).unflatten(1, (g, h // g))
        dq = torch.zeros_like(qg)
        dk = torch.zeros(k.shape, dtype=work, device=k.device)
        dv = torch.zeros(v.shape, dtype=work, device=v.device)
        for start in range(0, t, ctx.block_size):
            stop = min(start + ctx.block_size, t)
            k_block, v_block = k[:, :, start:stop].to(work), v[:, :, start:stop].to(work)
            allowed = block_allowed(grouped_mask, ctx.causal, s, t, start, stop, q.device)
            p = torch.exp(block_scores(qg, k_block, ctx.scale, allowed) - lse[..., None])  # recomputed P_j
            dv[:, :, start:stop] = torch.einsum("bgrst,bgrsf->bgtf", p, d_out)  # summed over the group's r heads
            d_scores = p * (torch.einsum("bgrsf,bgtf->bgrst", d_out, v_block) - d_row[..., None])
            dq += torch.einsum("bgrst,bgte->bgrse", d_scores, k_block) * ctx.scale
            dk[:, :, start:stop] = torch.einsum("bgrst,bgrse->bgte", d_scores, qg) * ctx.scale
        return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False,
                    scale: float | None = None, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """(out (b, h, s, e_v), lse (b, h, s)) of softmax(q k^T * scale) v over the allowed keys, computed over
    key blocks of ``block_size``; q (b, h, s, e), k (b, g, t, e), v (b, g, t, e_v)."""
    h, e = q.shape[1], q.shape[-1]
    g = k.shape[1]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    return TiledAttention.apply(q, k, v, mask, causal, scale, block_size)
