"""Mutants of scaled_dot_product_attention: the bugs learners write, each one branch of one function.

One function with a ``bug`` switch keeps every mutant a one-line difference from the correct math, which
is what makes each a realistic near miss (and keeps the catalog readable side by side).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat

from meta_tests.catalog import mutant


def buggy_sdpa(bug: str):
    def scaled_dot_product_attention(q, k, v, *, mask=None, causal=False, scale=None):
        b, h, s, e = q.shape
        g, t = k.shape[-3], k.shape[-2]
        if g != h:
            pattern = "b g t e -> b (r g) t e" if bug == "round_robin_gqa" else "b g t e -> b (g r) t e"
            k, v = repeat(k, pattern, r=h // g), repeat(v, pattern, r=h // g)
        if bug == "batch_and_heads_reshaped_not_transposed":
            k = k.transpose(0, 1).reshape(b, h, t, e)
        if scale is None:
            scale = {"missing_scale": 1.0, "scale_by_width": 1.0 / e,
                     "scale_by_value_width": 1.0 / math.sqrt(v.shape[-1])}.get(bug, 1.0 / math.sqrt(e))
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        allowed = torch.ones(s, t, dtype=torch.bool, device=q.device)
        if causal or bug == "always_causal":
            diagonal = {"causal_sees_one_future_key": t - s + 1, "causal_top_left": 0}.get(bug, t - s)
            allowed = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal)
            if bug == "causal_upside_down":
                allowed = torch.ones(s, t, dtype=torch.bool, device=q.device).triu(diagonal)
        if mask is not None:
            allowed = allowed & (~mask if bug == "inverted_mask_polarity" else mask)
        scores = scores.masked_fill(~allowed, float("-inf"))
        any_allowed = allowed.any(dim=-1, keepdim=True)
        if bug != "nan_on_fully_masked_rows":
            scores = scores.masked_fill(~any_allowed, 0.0)
        if bug == "naive_softmax":
            weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        elif bug == "naive_softmax_nan_zeroed":
            weights = torch.nan_to_num(scores.exp() / scores.exp().sum(dim=-1, keepdim=True), nan=0.0)
        elif bug == "softmax_over_queries":
            weights = F.softmax(scores, dim=-2)
        elif bug == "softmax_in_float32":
            weights = F.softmax(scores, dim=-1, dtype=torch.float32)
        else:
            weights = F.softmax(scores, dim=-1)
        if bug == "inplace_masked_fill_after_softmax":
            weights.masked_fill_(~any_allowed, 0.0)  # softmax saved `weights` for backward
        elif bug != "nan_on_fully_masked_rows":
            weights = weights.masked_fill(~any_allowed, 0.0)
        if bug == "detached_weights":
            weights = weights.detach()
        return torch.matmul(weights, v.to(weights.dtype))

    return scaled_dot_product_attention


CATALOG = {
    "missing_scale": ("scores are not multiplied by 1/sqrt(e)",
                      ["test_sdpa_agrees_with_reference", "test_sdpa_agrees_with_torch_sdpa"]),
    "scale_by_width": ("scores are divided by e instead of sqrt(e)", ["test_sdpa_agrees_with_reference"]),
    "softmax_over_queries": ("softmax over the query axis (dim=-2) instead of the keys",
                             ["test_sdpa_output_is_a_convex_combination_of_values"]),
    "causal_sees_one_future_key": ("causal mask off by one diagonal: each query sees the next key",
                                   ["test_causal_sdpa_never_leaks_the_future",
                                    "test_causal_sdpa_has_zero_jacobian_for_future_keys"]),
    "causal_upside_down": ("triu instead of tril: queries see the future, not the past",
                           ["test_causal_sdpa_depends_on_the_past", "test_causal_sdpa_never_leaks_the_future"]),
    "causal_top_left": ("causal mask aligned top-left when s != t (is_causal's convention, wrong for decoding)",
                        ["test_sdpa_agrees_with_reference", "test_sdpa_agrees_with_torch_sdpa"]),
    "always_causal": ("a causal mask is applied even when causal=False",
                      ["test_sdpa_is_invariant_to_permuting_keys_with_values",
                       "test_sdpa_is_equivariant_to_permuting_queries"]),
    "inverted_mask_polarity": ("mask read as True = masked out (nn.MultiheadAttention's polarity)",
                               ["test_sdpa_masked_keys_have_no_influence", "test_sdpa_masked_keys_get_zero_gradient"]),
    "nan_on_fully_masked_rows": ("softmax over a row of -inf: NaN for a query with no allowed key",
                                 ["test_sdpa_fully_masked_query_rows_are_zero"]),
    "naive_softmax": ("exp(s) / sum exp(s) without subtracting the row maximum",
                      ["test_sdpa_stays_finite_for_large_scores"]),
    "naive_softmax_nan_zeroed": ("softmax without the row maximum, its inf / inf = NaN replaced by zeros "
                                 "(finite and within the values' range, but wrong)",
                                 ["test_sdpa_stays_finite_for_large_scores"]),
    "scale_by_value_width": ("scores scaled by 1/sqrt of the value head width instead of the key width",
                             ["test_sdpa_agrees_with_reference", "test_sdpa_agrees_with_torch_sdpa"]),
    "detached_weights": ("attention weights .detach()ed: no gradient reaches q and k",
                         ["test_sdpa_passes_gradcheck"]),
    "inplace_masked_fill_after_softmax": ("masked_fill_ in place on the softmax output autograd saved",
                                          ["test_sdpa_passes_gradcheck"]),
    "round_robin_gqa": ("KV heads repeated round-robin (query head i reads KV head i % g)",
                        ["test_sdpa_agrees_with_torch_sdpa", "test_sdpa_agrees_with_reference"]),
    "batch_and_heads_reshaped_not_transposed": ("keys reshaped (h, b) -> (b, h) without transposing: batches mix",
                                                ["test_sdpa_batch_elements_are_independent"]),
    "softmax_in_float32": ("softmax(dtype=float32) and never cast back: float64 inputs give float32",
                           ["test_sdpa_preserves_dtype_and_device"]),
}

for _bug, (_why, _props) in CATALOG.items():
    mutant(name=f"sdpa_{_bug}", bug=_why, caught_by=_props, provides="scaled_dot_product_attention")(buggy_sdpa(_bug))
