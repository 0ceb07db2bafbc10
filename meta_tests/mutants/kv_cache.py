"""Mutants of the KV cache and of cached attention."""

from __future__ import annotations

import torch

from implementations.attention import MultiHeadAttention
from implementations.grouped_query_attention import GroupedQueryAttention
from implementations.kv_cache import KVCache
from meta_tests.catalog import mutant
from meta_tests.mutants.sdpa import buggy_sdpa


@mutant(name="KVCache_appends_on_feature_axis", bug="new keys concatenated on the last axis instead of positions", provides="KVCache",
        caught_by=["test_kv_cache_update_returns_everything_appended", "test_cached_attention_equals_the_full_pass"])
class KVCache_FeatureAxis(KVCache):
    def update(self, k, v):
        if self.length == 0:
            self._k, self._v = k, v
        else:
            self._k, self._v = torch.cat([self._k, k], dim=-1), torch.cat([self._v, v], dim=-1)
        self.length += k.shape[-2]
        return self._k, self._v


@mutant(name="KVCache_never_stores", bug="update returns the new keys and values but never stores them",
        caught_by=["test_cached_attention_equals_the_full_pass", "test_kv_cache_update_returns_everything_appended"],
        provides="KVCache")
class KVCache_NeverStores(KVCache):
    def update(self, k, v):
        self.length += k.shape[-2]
        return k, v


@mutant(name="KVCache_grows_past_capacity", bug="a full cache grows by concatenation instead of refusing",
        caught_by=["test_kv_cache_rejects_appending_past_its_capacity"], provides="KVCache")
class KVCache_Grows(KVCache):
    def update(self, k, v):
        n = k.shape[-2]
        if self.length + n > self.capacity:
            grow = self.length + n - self.capacity
            pad = torch.zeros(*self.keys.shape[:2], grow, self.keys.shape[-1], dtype=self.keys.dtype)
            self.keys, self.values = torch.cat([self.keys, pad], 2), torch.cat([self.values, pad], 2)
            self.capacity += grow
        return super().update(k, v)


@mutant(name="KVCache_reset_keeps_length", bug="reset() zeroes the storage but leaves the length",
        caught_by=["test_kv_cache_reset_forgets_the_previous_sequence"], provides="KVCache")
class KVCache_ResetKeepsLength(KVCache):
    def reset(self):
        self.keys.zero_()
        self.values.zero_()


@mutant(name="KVCache_position_major", bug="storage laid out (b, capacity, g, e) instead of (b, g, capacity, e)",
        caught_by=["test_kv_cache_holds_n_kv_head_heads"], provides="KVCache")
class KVCache_PositionMajor(KVCache):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.keys, self.values = self.keys.transpose(1, 2), self.values.transpose(1, 2)

    def update(self, k, v):
        n, L = k.shape[-2], self.length
        if L + n > self.capacity:
            raise ValueError("capacity exceeded")
        self.keys[:, L : L + n], self.values[:, L : L + n] = k.transpose(1, 2), v.transpose(1, 2)
        self.length += n
        return self.keys[:, : self.length].transpose(1, 2), self.values[:, : self.length].transpose(1, 2)


class _RopeOffsetIgnored(MultiHeadAttention):
    """Rotates every chunk as if it started at position 0."""

    def attend(self, x, context, *, mask, causal, cache=None):
        rotary = self.rotary
        if rotary is not None:
            self.rotary = lambda t, offset=0: rotary(t, offset=0)
        try:
            return super().attend(x, context, mask=mask, causal=causal, cache=cache)
        finally:
            self.rotary = rotary


mutant(name="MultiHeadAttention_rope_offset_ignored", bug="RoPE ignores the cache offset while decoding",
       caught_by=["test_cached_attention_equals_the_full_pass"], provides="MultiHeadAttention",
       params={"rope": True})(_RopeOffsetIgnored)


class _TopLeftCausal(GroupedQueryAttention):
    """Causal mask aligned top-left (is_causal's convention): a chunk's query j sees keys 0 .. j only."""

    def attend(self, x, context, *, mask, causal, cache=None):
        import implementations.attention as attention_module

        original = attention_module.scaled_dot_product_attention
        attention_module.scaled_dot_product_attention = buggy_sdpa("causal_top_left")
        try:
            return super().attend(x, context, mask=mask, causal=causal, cache=cache)
        finally:
            attention_module.scaled_dot_product_attention = original


mutant(name="GroupedQueryAttention_top_left_causal_when_cached",
       bug="cached chunk masked top-left (query j sees keys 0..j), as is_causal=True does when s != t",
       caught_by=["test_cached_attention_equals_the_full_pass"], provides="GroupedQueryAttention")(_TopLeftCausal)
