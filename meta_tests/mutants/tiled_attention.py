"""Mutants of tiled_attention: the bugs of a first FlashAttention in torch, each one branch of one function.

The mutants share one compact implementation (K and V repeated per query head, plain matmuls) with a
``bug`` switch, so that each is a one-line difference from correct tiled attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from meta_tests.catalog import mutant


def _repeat_heads(k: Tensor, r: int, bug: str) -> Tensor:
    return k.repeat(1, r, 1, 1) if bug == "round_robin_gqa" else k.repeat_interleave(r, dim=1)


def _blocks(t: int, block_size: int, bug: str) -> list[tuple[int, int]]:
    end = (t // block_size) * block_size if bug == "last_partial_block_dropped" else t  # range(t // B) blocks
    return [(start, min(start + block_size, t)) for start in range(0, end, block_size)]


def _allowed(mask: Tensor | None, causal: bool, s: int, t: int, start: int, stop: int, bug: str) -> Tensor:
    allowed = torch.ones(s, stop - start, dtype=torch.bool, device=mask.device if mask is not None else None)
    if causal:
        first = 0 if bug == "causal_mask_without_block_offset" else start  # block-local key indices
        diagonal = 0 if bug == "causal_top_left" else t - s
        keys = torch.arange(first, first + stop - start, device=allowed.device)
        allowed = keys[None, :] <= torch.arange(s, device=allowed.device)[:, None] + diagonal
    return allowed if mask is None else allowed & mask[..., start:stop]


def _scores(q: Tensor, k_block: Tensor, scale: float, allowed: Tensor, bug: str) -> Tensor:
    if bug == "scores_in_bfloat16":  # "for speed": the matmul in bfloat16, the rest in the working dtype
        scores = (q.bfloat16() @ k_block.bfloat16().transpose(-2, -1)).to(q.dtype)
    else:
        scores = q @ k_block.transpose(-2, -1)
    return (scores * scale).masked_fill(~allowed, float("-inf"))


def _forward(q, k, v, mask, causal, scale, block_size, bug):
    """(out, lse, the last block's probabilities, all probabilities (only for the bug that keeps them))."""
    h, s = q.shape[1], q.shape[2]
    r, t = h // k.shape[1], k.shape[2]
    work = torch.float32 if bug == "output_left_in_float32" else torch.promote_types(q.dtype, torch.float32)
    qw, k, v = q.to(work), _repeat_heads(k, r, bug).to(work), _repeat_heads(v, r, bug).to(work)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=work, device=q.device)
    l = torch.zeros_like(m)
    o = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=work, device=q.device)
    blocks, p = _blocks(t, block_size, bug), None
    for start, stop in blocks:
        scores = _scores(qw, k[:, :, start:stop], scale, _allowed(mask, causal, s, t, start, stop, bug), bug)
        m_new = torch.maximum(m, scores.amax(dim=-1))
        shift = torch.where(torch.isfinite(m_new), m_new, 0.0)
        p = torch.exp(scores - shift[..., None])
        rescale = torch.exp(m - shift)
        l = (l if bug == "normalizer_not_rescaled" else rescale * l) + p.sum(dim=-1)
        o = (o if bug == "numerator_not_rescaled" else rescale[..., None] * o) + p @ v[:, :, start:stop]
        m = m_new
    empty = l == 0
    out = o / (l if bug == "nan_on_fully_masked_rows" else torch.where(empty, 1.0, l))[..., None]
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l)))
    lse = m if bug == "lse_is_the_running_max" else lse
    full = None
    if bug == "saves_full_probabilities":  # P = exp(S - lse) of every block, kept for backward in one tensor
        full = torch.cat([torch.exp(_scores(qw, k[:, :, a:z], scale, _allowed(mask, causal, s, t, a, z, bug), bug)
                                    - lse[..., None]) for a, z in blocks], dim=-1)
    return (out if bug == "output_left_in_float32" else out.to(q.dtype)), lse, p, full


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block_size, bug):
        out, lse, last_p, full = _forward(q, k, v, mask, causal, scale, block_size, bug)
        ctx.save_for_backward(q, k, v, mask, out, lse, last_p, full)
        ctx.config = causal, scale, block_size, bug
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, mask, out, lse, last_p, full = ctx.saved_tensors
        causal, scale, block_size, bug = ctx.config
        g, (h, s), t = k.shape[1], q.shape[1:3], k.shape[2]
        r, work = h // g, lse.dtype
        qw, d_out = q.to(work), d_out.to(work)
        kr, vr = _repeat_heads(k, r, bug).to(work), _repeat_heads(v, r, bug).to(work)
        d_row = torch.zeros_like(lse) if bug == "backward_without_the_D_term" else (d_out * out.to(work)).sum(-1)
        lse_shift = torch.where(torch.isinf(lse), float("inf"), lse)
        dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kr), torch.zeros_like(vr)
        if bug == "backward_recomputes_the_full_matrix":  # one (s, t) P instead of a block at a time
            blocks = [(0, t)]
        else:
            blocks = _blocks(t, block_size, bug)
        for start, stop in blocks:
            allowed = _allowed(mask, causal, s, t, start, stop, bug)
            if bug == "saves_full_probabilities":
                p = full[..., start:stop]
            elif bug == "backward_reuses_the_last_blocks_probabilities":
                p = last_p  # the loop variable left over from the forward
            else:
                p = torch.exp(_scores(qw, kr[:, :, start:stop], scale, allowed, bug) - lse_shift[..., None])
            dv[:, :, start:stop] = p.transpose(-2, -1) @ d_out
            d_scores = p * (d_out @ vr[:, :, start:stop].transpose(-2, -1) - d_row[..., None])
            dq += d_scores @ kr[:, :, start:stop] * scale
            dk[:, :, start:stop] = d_scores.transpose(-2, -1) @ qw * scale

        def per_kv_head(grad: Tensor) -> Tensor:
            grouped = grad.unflatten(1, (r, g) if bug == "round_robin_gqa" else (g, r))
            if bug == "dk_dv_not_summed_over_the_group":
                return grouped[:, :, 0]  # only the first query head of each group
            return grouped.sum(dim=1 if bug == "round_robin_gqa" else 2)

        return (dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype),
                None, None, None, None, None)


def buggy_tiled(bug: str):
    def tiled_attention(q, k, v, *, mask=None, causal=False, scale=None, block_size=64):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if bug == "autograd_through_the_block_loop":  # no autograd.Function: autograd keeps every block
            out, lse, _, _ = _forward(q, k, v, mask, causal, scale, block_size, bug)
            return out, lse.detach()
        return _Tiled.apply(q, k, v, mask, causal, scale, block_size, bug)

    return tiled_attention


CATALOG = {
    "numerator_not_rescaled": ("the running numerator O is not rescaled by exp(m_old - m_new) when the maximum grows",
                               ["test_tiled_attention_agrees_with_reference"]),
    "normalizer_not_rescaled": ("the running normalizer l is not rescaled by exp(m_old - m_new) when the maximum grows",
                                ["test_tiled_attention_agrees_with_reference",
                                 "test_tiled_attention_log_sum_exp_agrees_with_reference"]),
    "lse_is_the_running_max": ("the log-sum-exp returned (and used in backward) is the running maximum m, not "
                               "m + log l",
                               ["test_tiled_attention_log_sum_exp_agrees_with_reference",
                                "test_tiled_attention_gradients_agree_with_torch_sdpa"]),
    "causal_top_left": ("causal mask aligned top-left (key y <= query x) when s != t",
                        ["test_tiled_attention_agrees_with_reference",
                         "test_tiled_attention_gradients_agree_with_torch_sdpa"]),
    "causal_mask_without_block_offset": ("the causal mask of a block compares block-local key indices (no offset)",
                                         ["test_tiled_attention_agrees_with_reference"]),
    "nan_on_fully_masked_rows": ("out = O / l with l = 0 for a query with no allowed key: NaN",
                                 ["test_tiled_attention_fully_masked_rows_are_zero"]),
    "last_partial_block_dropped": ("the loop runs over t // block_size blocks and skips the last, shorter one",
                                   ["test_tiled_attention_agrees_with_reference",
                                    "test_tiled_attention_log_sum_exp_agrees_with_reference"]),
    "backward_reuses_the_last_blocks_probabilities": ("backward uses the forward's last block of probabilities "
                                                      "for every block instead of recomputing each",
                                                      ["test_tiled_attention_gradients_agree_with_torch_sdpa"]),
    "backward_without_the_D_term": ("backward takes dS = P * dP, dropping D = rowsum(dout * out)",
                                    ["test_tiled_attention_gradients_agree_with_torch_sdpa"]),
    "dk_dv_not_summed_over_the_group": ("dK and dV of a KV head come from the first query head of its group only",
                                        ["test_tiled_attention_gradients_agree_with_torch_sdpa"]),
    "round_robin_gqa": ("KV heads repeated round-robin (query head i reads KV head i % g)",
                        ["test_tiled_attention_agrees_with_reference"]),
    "saves_full_probabilities": ("the forward concatenates every block's probabilities into one (b, h, s, t) "
                                 "tensor and saves it for backward",
                                 ["test_tiled_attention_never_materializes_the_score_matrix"]),
    "autograd_through_the_block_loop": ("no autograd.Function: autograd differentiates the block loop and keeps "
                                        "every block's scores and probabilities",
                                        ["test_tiled_attention_never_materializes_the_score_matrix"]),
    "backward_recomputes_the_full_matrix": ("backward recomputes P for all keys at once, an (s, t) matrix",
                                            ["test_tiled_attention_never_materializes_the_score_matrix"]),
    "scores_in_bfloat16": ("q k^T computed in bfloat16 for speed, the rest in float32",
                           ["test_tiled_attention_is_as_accurate_as_flash_attention",
                            "test_tiled_attention_agrees_with_reference"]),
    "output_left_in_float32": ("everything computed in float32 and the output never cast back: float64 inputs "
                               "give a float32 output",
                               ["test_tiled_attention_preserves_dtype_and_device"]),
}

for _bug, (_why, _props) in CATALOG.items():
    mutant(name=f"tiled_{_bug}", bug=_why, caught_by=_props, provides="tiled_attention")(buggy_tiled(_bug))
