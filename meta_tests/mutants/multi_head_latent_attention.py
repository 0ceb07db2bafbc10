"""Mutants of multi-head latent attention and its latent cache: each is ours with one realistic slip."""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from implementations.multi_head_latent_attention import LatentKVCache, MultiHeadLatentAttention
from implementations.rotary_embedding import RotaryEmbedding
from implementations.sdpa import scaled_dot_product_attention
from meta_tests.catalog import mutant

MLA = "MultiHeadLatentAttention"
REFERENCE = "test_mla_agrees_with_reference"
ABSORBED = "test_mla_absorbed_form_equals_the_naive_form"
CACHED = "test_cached_mla_equals_the_full_pass"
CACHE_HOLDS = "test_mla_cache_holds_only_the_latent_and_the_rotated_shared_key"
LOW_RANK = "test_mla_without_norms_and_rotated_query_is_low_rank_mha"
SHARED = "test_mla_heads_share_the_latent_and_the_rotated_key"
RELATIVE = "test_mla_depends_only_on_relative_positions"


@mutant(name="MLA_rope_on_the_latent", provides=MLA, caught_by=[REFERENCE, ABSORBED, RELATIVE],
        bug="the naive form rotates the compressed latent c_KV by position (the absorbed form cannot)")
class MLA_RopeOnLatent(MultiHeadLatentAttention):
    def attend_naive(self, q_c, q_r, c, k_r, *, mask, causal):
        even = c.shape[-1] - c.shape[-1] % 2  # RoPE rotates pairs: the latent's first even width
        rotated = RotaryEmbedding(head_dim=even)(c[:, None, :, :even])[:, 0]
        return super().attend_naive(q_c, q_r, torch.cat([rotated, c[..., even:]], dim=-1), k_r, mask=mask, causal=causal)


@mutant(name="MLA_rope_key_rotated_per_head", provides=MLA, caught_by=[REFERENCE, SHARED, CACHE_HOLDS],
        bug="the shared key is expanded to heads in (b, s, h, r) layout before RoPE, which reads axis -2 as "
        "positions: head i's key is rotated by i, not by its token's position")
class MLA_RopeKeyPerHead(MultiHeadLatentAttention):
    spec_options = {"absorbed": False}  # per-head rotated keys leave nothing to absorb

    def latent_and_rope_key(self, x, start):
        c, _ = super().latent_and_rope_key(x, start)
        return c, (self.k_rope(x) if self.rope_dim else x.new_zeros(*x.shape[:2], 0))  # not rotated yet

    def attend_naive(self, q_c, q_r, c, k_r, *, mask, causal):
        h, r = self.n_head, self.rope_dim
        k = rearrange(self.k_up(c), "b t (h e) -> b h t e", h=h)
        v = rearrange(self.v_up(c), "b t (h e) -> b h t e", h=h)
        q = q_c
        if r:
            per_head = self.rotary(k_r[:, :, None].expand(-1, -1, h, -1))  # (b, t, h, r): rotated along h
            q, k = torch.cat([q_c, q_r], dim=-1), torch.cat([k, per_head.transpose(1, 2)], dim=-1)
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=self.scale)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))


@mutant(name="MLA_scale_without_rope_width", provides=MLA, caught_by=[REFERENCE, LOW_RANK],
        bug="scores scaled by 1/sqrt(head_dim), leaving out the rope width")
class MLA_ScaleWithoutRope(MultiHeadLatentAttention):
    @property
    def scale(self):
        return 1.0 / math.sqrt(self.head_dim)


@mutant(name="MLA_caches_full_keys_and_values", provides=MLA, caught_by=[CACHE_HOLDS],
        bug="the cache gets the up-projected per-head keys and values (2 n_head head_dim per token), as "
        "HF's DeepseekV2 with a DynamicCache: right outputs, none of MLA's memory saving")
class MLA_CachesFullKV(MultiHeadLatentAttention):
    def forward(self, x, *, mask=None, causal=False, cache=None, absorbed=False):
        if cache is None:
            return super().forward(x, mask=mask, causal=causal, absorbed=absorbed)
        h, r = self.n_head, self.rope_dim
        start = cache.length
        q_c, q_r = self.queries(x, start)
        c, k_r = self.latent_and_rope_key(x, start)
        k = rearrange(self.k_up(c), "b t (h e) -> b h t e", h=h)
        v = rearrange(self.v_up(c), "b t (h e) -> b h t e", h=h)
        q = q_c
        if r:
            q, k = torch.cat([q_c, q_r], dim=-1), torch.cat([k, k_r[:, None].expand(-1, h, -1, -1)], dim=-1)
        if start:
            k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
        cache.keys, cache.values, cache.length = k, v, start + x.shape[1]
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=self.scale)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))


@mutant(name="MLA_cache_keeps_the_latent_before_its_norm", provides=MLA, caught_by=[CACHE_HOLDS],
        bug="the cache keeps c_KV before its RMSNorm and normalises on every read (right outputs, not the "
        "latent the spec pins)")
class MLA_CacheBeforeNorm(MultiHeadLatentAttention):
    def forward(self, x, *, mask=None, causal=False, cache=None, absorbed=False):
        if cache is None or self.kv_norm is None:
            return super().forward(x, mask=mask, causal=causal, cache=cache, absorbed=absorbed)
        start = cache.length
        q_c, q_r = self.queries(x, start)
        _, k_r = self.latent_and_rope_key(x, start)
        c, k_r = cache.update(self.kv_down(x), k_r)
        attend = self.attend_absorbed if absorbed else self.attend_naive
        return attend(q_c, q_r, self.kv_norm(c), k_r, mask=mask, causal=causal)


@mutant(name="MLA_absorbed_w_uk_bare_view", provides=MLA, caught_by=[ABSORBED, REFERENCE],
        bug="the absorbed form reshapes W_uk (h*e, l) with a bare view as (h, l, e): a transposed W_uk per head")
class MLA_AbsorbedBareView(MultiHeadLatentAttention):
    def latent_query(self, q_c):
        w_uk = self.k_up.weight.view(self.n_head, self.kv_rank, self.head_dim)  # should be '(h e) l -> h e l'
        return einsum(q_c, w_uk, "b h s e, h l e -> b h s l")


@mutant(name="MLA_absorbed_form_drops_the_rope_scores", provides=MLA, caught_by=[ABSORBED],
        bug="the absorbed form attends over the latents alone, leaving the rotated part out of the scores")
class MLA_AbsorbedNoRope(MultiHeadLatentAttention):
    def attend_absorbed(self, q_c, q_r, c, k_r, *, mask, causal):
        h = self.n_head
        w_uv = rearrange(self.v_up.weight, "(h e) l -> h e l", h=h)
        w_o = rearrange(self.o.weight, "d (h e) -> d h e", h=h)
        a = scaled_dot_product_attention(self.latent_query(q_c), c[:, None], c[:, None], mask=mask, causal=causal,
                                         scale=self.scale)
        out = einsum(a, einsum(w_o, w_uv, "d h e, h e l -> d h l"), "b h s l, d h l -> b s d")
        if self.v_up.bias is not None:
            out = out + self.o.weight @ self.v_up.bias
        return out + self.o.bias if self.o.bias is not None else out


@mutant(name="MLA_rope_offset_lost_in_the_cache_path", provides=MLA, caught_by=[CACHED, CACHE_HOLDS],
        bug="with a cache, every chunk's query and key parts are rotated as if the chunk started at position 0")
class MLA_RopeOffsetLost(MultiHeadLatentAttention):
    def queries(self, x, start):
        return super().queries(x, 0)

    def latent_and_rope_key(self, x, start):
        return super().latent_and_rope_key(x, 0)


@mutant(name="MLA_top_left_causal_with_cache", provides=MLA, caught_by=[CACHED],
        bug="with a cache the causal mask is aligned top-left (torch.ones(s, t).tril()): a chunk's queries "
        "miss the keys of their own chunk")
class MLA_TopLeftCausal(MultiHeadLatentAttention):
    def forward(self, x, *, mask=None, causal=False, cache=None, absorbed=False):
        if causal and cache is not None:
            s, t = x.shape[1], cache.length + x.shape[1]
            mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril()
            causal = False
        return super().forward(x, mask=mask, causal=causal, cache=cache, absorbed=absorbed)


@mutant(name="MLA_causal_flag_ignored", provides=MLA, caught_by=["test_causal_mla_never_leaks_the_future"],
        bug="the causal flag never reaches the mask")
class MLA_CausalIgnored(MultiHeadLatentAttention):
    def forward(self, x, *, mask=None, causal=False, cache=None, absorbed=False):
        return super().forward(x, mask=mask, causal=False, cache=cache, absorbed=absorbed)


@mutant(name="MLA_absorbed_form_ignores_the_mask", provides=MLA,
        caught_by=["test_mla_masked_keys_have_no_influence", REFERENCE],
        bug="the absorbed form drops the mask (the naive form applies it)")
class MLA_AbsorbedNoMask(MultiHeadLatentAttention):
    def attend_absorbed(self, q_c, q_r, c, k_r, *, mask, causal):
        return super().attend_absorbed(q_c, q_r, c, k_r, mask=None, causal=causal)


@mutant(name="MLA_rope_key_of_the_first_sequence", provides=MLA,
        caught_by=["test_mla_batch_elements_are_independent", REFERENCE],
        bug="the shared rotated key is broadcast from batch element 0 (expand over the wrong axis)")
class MLA_RopeKeyFirstSequence(MultiHeadLatentAttention):
    def latent_and_rope_key(self, x, start):
        c, k_r = super().latent_and_rope_key(x, start)
        return c, k_r[:1].expand_as(k_r)


@mutant(name="MLA_values_from_the_key_projection", provides=MLA, caught_by=[REFERENCE, LOW_RANK],
        bug="values are up-projected with W_uk instead of W_uv")
class MLA_ValuesFromKeys(MultiHeadLatentAttention):
    def attend_naive(self, q_c, q_r, c, k_r, *, mask, causal):
        v_up = self.v_up
        self.v_up = self.k_up
        try:
            return super().attend_naive(q_c, q_r, c, k_r, mask=mask, causal=causal)
        finally:
            self.v_up = v_up

    def attend_absorbed(self, q_c, q_r, c, k_r, *, mask, causal):
        v_up = self.v_up
        self.v_up = self.k_up
        try:
            return super().attend_absorbed(q_c, q_r, c, k_r, mask=mask, causal=causal)
        finally:
            self.v_up = v_up


@mutant(name="MLA_latent_detached", provides=MLA, caught_by=["test_every_mla_parameter_gets_a_finite_gradient"],
        bug="the latent is .detach()ed before the up-projections: W_dkv and the kv norm learn nothing")
class MLA_LatentDetached(MultiHeadLatentAttention):
    def latent_and_rope_key(self, x, start):
        c, k_r = super().latent_and_rope_key(x, start)
        return c.detach(), k_r


@mutant(name="MLA_query_rope_part_not_rotated", provides=MLA, caught_by=[RELATIVE, REFERENCE],
        bug="only the key part is rotated; the query's rotated part is left at position 0")
class MLA_QueryNotRotated(MultiHeadLatentAttention):
    def queries(self, x, start):
        q_c, q_r = super().queries(x, start)
        if q_r is None:
            return q_c, None
        q_in = x if self.q_rank is None else self.q_down(x)
        if self.q_rank is not None and self.q_norm is not None:
            q_in = self.q_norm(q_in)
        return q_c, rearrange(self.q_rope(q_in), "b s (h r) -> b h s r", h=self.n_head)  # never rotated


@mutant(name="MLA_query_rope_heads_round_robin", provides=MLA, caught_by=[SHARED, REFERENCE],
        bug="the per-head rotated query is split as '(r h)': head i reads every h-th row of W_qr")
class MLA_QueryRopeRoundRobin(MultiHeadLatentAttention):
    def queries(self, x, start):
        q_c, q_r = super().queries(x, 0)
        if q_r is None:
            return q_c, None
        q_in = x if self.q_rank is None else self.q_down(x)
        if self.q_rank is not None and self.q_norm is not None:
            q_in = self.q_norm(q_in)
        q_r = rearrange(self.q_rope(q_in), "b s (r h) -> b h s r", h=self.n_head)
        return q_c, self.rotary(q_r, offset=start)


@mutant(name="LatentKVCache_never_stores", provides="LatentKVCache", caught_by=[CACHED, CACHE_HOLDS],
        bug="update returns the new latents and keys but never stores them")
class LatentKVCache_NeverStores(LatentKVCache):
    def update(self, latent, rope_key):
        self.length += latent.shape[1]
        return latent, rope_key
