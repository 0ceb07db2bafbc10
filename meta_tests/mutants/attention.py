"""Mutants of the attention modules: each overrides ``attend`` of ours with one realistic slip.

``buggy_attend(bug)`` is the correct body with one branch per bug, so each mutant reads as a near miss.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from implementations.attention import CrossAttention, MultiHeadAttention, SelfAttention
from implementations.grouped_query_attention import GroupedQueryAttention
from implementations.sdpa import scaled_dot_product_attention
from meta_tests.catalog import mutant
from meta_tests.mutants.sdpa import buggy_sdpa


def buggy_attend(bug: str):
    sdpa = buggy_sdpa("inplace_masked_fill_after_softmax") if bug == "inplace_mask" else scaled_dot_product_attention

    def attend(self, x, context, *, mask, causal, cache=None):
        b, s, _ = x.shape
        t = context.shape[1]
        h, g, e = self.n_head, self.n_kv_head, self.head_dim
        if bug == "batch_first_confusion":  # treats (b, s, d) as (s, b, d), like nn.MultiheadAttention's default
            x, context = x.transpose(0, 1), context.transpose(0, 1)
            b, s, t = s, b, b
        if bug == "cross_kv_from_queries":
            context = x
        q, k, v = self.q(x), self.k(context), self.v(context)
        if bug == "detached_keys":
            k = k.detach()
        if bug == "heads_split_without_transpose":
            q = q.reshape(b, h, s, e)  # a bare view: positions and heads mix
            k, v = k.reshape(b, g, t, e), v.reshape(b, g, t, e)
        else:
            q = rearrange(q, "b s (h e) -> b h s e", h=h)
            k = rearrange(k, "b t (g e) -> b g t e", g=g)
            v = rearrange(v, "b t (g e) -> b g t e", g=g)
        if mask is not None and bug == "padding_mask_on_queries":
            mask = mask.transpose(-2, -1)  # (b, 1, 1, t) -> (b, 1, t, 1): masks queries, not keys
        scale = 1.0 / math.sqrt(self.d_model) if bug == "scale_by_d_model" else None
        if bug == "causal_flag_ignored":
            causal = False
        if bug == "cross_with_causal_mask":
            causal = True
        a = sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
        if bug == "heads_merged_without_transpose":
            merged = a.reshape(b, s, h * e)
        else:
            merged = rearrange(a, "b h s e -> b s (h e)")
        out = merged if bug == "missing_output_projection" else self.o(merged)
        if bug == "batch_first_confusion":
            out = out.transpose(0, 1)
        if bug == "output_in_float32":
            out = out.float()
        return out

    return attend


def _mutant_of(base, bug: str, why: str, caught_by: list[str]):
    cls = type(f"{base.__name__}_{bug}", (base,), {"attend": buggy_attend(bug)})
    mutant(name=f"{base.__name__}_{bug}", bug=why, caught_by=caught_by, provides=base.__name__)(cls)


_mutant_of(MultiHeadAttention, "scale_by_d_model", "scores scaled by 1/sqrt(d_model) instead of 1/sqrt(head_dim)",
           ["test_attention_module_agrees_with_reference", "test_multi_head_attention_agrees_with_torch_multihead_attention"])
_mutant_of(SelfAttention, "missing_output_projection", "the output projection o is never applied",
           ["test_attention_module_agrees_with_reference", "test_multi_head_attention_with_one_head_equals_self_attention",
            "test_every_attention_parameter_gets_a_finite_gradient"])
_mutant_of(MultiHeadAttention, "heads_split_without_transpose", "heads split with a bare view (b, s, d) -> (b, h, s, e)",
           ["test_attention_module_agrees_with_reference", "test_self_attention_is_equivariant_to_permuting_positions"])
_mutant_of(MultiHeadAttention, "heads_merged_without_transpose", "heads merged with a bare view (b, h, s, e) -> (b, s, d)",
           ["test_attention_module_agrees_with_reference", "test_self_attention_is_equivariant_to_permuting_positions"])
_mutant_of(CrossAttention, "cross_kv_from_queries", "cross-attention takes keys and values from x, not the context",
           ["test_attention_module_agrees_with_reference", "test_cross_attention_masked_context_gets_zero_gradient"])
_mutant_of(CrossAttention, "cross_with_causal_mask", "decoder self-attention code reused: a causal mask in cross-attention",
           ["test_cross_attention_on_its_own_input_equals_multi_head_attention",
            "test_cross_attention_is_invariant_to_permuting_the_context"])
_mutant_of(MultiHeadAttention, "causal_flag_ignored", "the causal flag never reaches the mask",
           ["test_causal_attention_never_leaks_the_future", "test_causal_attention_has_zero_jacobian_for_future_inputs"])
_mutant_of(MultiHeadAttention, "padding_mask_on_queries", "a (b, 1, 1, t) padding mask transposed onto the query axis",
           ["test_attention_masked_keys_have_no_influence", "test_attention_fully_masked_query_row_gives_finite_output"])
_mutant_of(MultiHeadAttention, "batch_first_confusion", "(b, s, d) read as (s, b, d): attention runs across the batch",
           ["test_attention_batch_elements_are_independent"])
_mutant_of(MultiHeadAttention, "detached_keys", "the key projection is .detach()ed",
           ["test_attention_module_passes_gradcheck", "test_every_attention_parameter_gets_a_finite_gradient"])
_mutant_of(MultiHeadAttention, "inplace_mask", "masked_fill_ in place on the softmax output that autograd saved",
           ["test_attention_module_passes_gradcheck"])
_mutant_of(GroupedQueryAttention, "output_in_float32", "the output is cast to float32 whatever the input dtype",
           ["test_attention_module_preserves_dtype_and_device"])


class _UpsideDownCausalMHA(MultiHeadAttention):
    """Causal mask built with triu: every query sees the future and not the past."""

    def attend(self, x, context, *, mask, causal, cache=None):
        if causal:
            s = x.shape[1]
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu()
            causal = False
        return super().attend(x, context, mask=mask, causal=causal, cache=cache)


mutant(name="MultiHeadAttention_causal_upside_down", bug="causal mask built with triu (future visible, past hidden)",
       caught_by=["test_causal_attention_depends_on_the_past"], provides="MultiHeadAttention")(_UpsideDownCausalMHA)
