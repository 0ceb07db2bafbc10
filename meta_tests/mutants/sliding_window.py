"""Mutants of sliding-window attention and its rolling KV cache."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from implementations.sliding_window import RollingKVCache, SlidingWindowAttention
from implementations.sliding_window import sliding_window_mask as correct_mask
from meta_tests.catalog import mutant


@mutant(name="sliding_window_mask_misses_the_oldest_key",
        bug="the band keeps j > i - w + 1: w - 1 keys (the window counted without the query itself)",
        caught_by=["test_sliding_window_mask_keeps_the_last_window_keys_of_each_query"])
def sliding_window_mask(s, t, *, window):
    return correct_mask(s, t, window=window) & torch.ones(s, t, dtype=torch.bool).triu(t - s - window + 2)


class _OneKeyTooMany(SlidingWindowAttention):
    """Mistral's one-file reference mask, tril().triu(-w): keys i - w .. i, w + 1 of them."""

    def forward(self, x, *, cache=None):
        s = x.shape[1]
        held = 0 if cache is None else min(cache.length, self.window)
        band = torch.ones(s, held + s, dtype=torch.bool, device=x.device).tril(held).triu(held - self.window)
        return self.attend(x, x, mask=band, causal=False, cache=cache)


mutant(name="SlidingWindowAttention_sees_window_plus_one_keys",
       bug="the band is tril().triu(-w): w + 1 keys (flash-attention's window_size=(w, 0); HF #29623)",
       caught_by=["test_sliding_window_attention_equals_attention_with_the_banded_causal_mask"],
       provides="SlidingWindowAttention")(_OneKeyTooMany)


class _AtTheSlot(nn.Module):
    def __init__(self, rotary: nn.Module, window: int) -> None:
        super().__init__()
        self.inner, self.window = rotary, window

    def forward(self, t, *, offset=0, positions=None):
        return self.inner(t, offset=offset % self.window, positions=positions)


class _RopeAtTheSlot(SlidingWindowAttention):
    """Rotates a chunk at its slot (cache.length % w) instead of its absolute position."""

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.rotary is not None:
            self.rotary = _AtTheSlot(self.rotary, self.window)


mutant(name="SlidingWindowAttention_rope_at_the_slot", bug="RoPE rotates a chunk at its slot position mod w, not "
       "its absolute position", caught_by=["test_rolling_cache_decoding_equals_the_full_banded_pass"],
       provides="SlidingWindowAttention")(_RopeAtTheSlot)


class _AttendsOverTheCacheAfterWriting(SlidingWindowAttention):
    """Mistral's decode step (write, then attend over the cache) used for every chunk: a chunk longer than
    one token sees only the last w positions, so its early queries lose their keys."""

    def forward(self, x, *, cache=None):
        if cache is None:
            return super().forward(x)
        s, w = x.shape[1], self.window

        def written(k, v):  # what the cache holds once the chunk is written: the last w positions
            k_win, v_win = cache.update(k, v)
            return k_win[:, :, -w:], v_win[:, :, -w:]

        t = min(cache.length + s, w)
        band = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s).triu(t - s - w + 1)
        return self.attend(x, x, mask=band, causal=False, cache=SimpleNamespace(length=cache.length, update=written))


mutant(name="SlidingWindowAttention_attends_over_the_cache_after_writing",
       bug="a chunk attends over the cache after writing it (the last w positions only), not over held ++ chunk",
       caught_by=["test_rolling_cache_decoding_equals_the_full_banded_pass"],
       provides="SlidingWindowAttention")(_AttendsOverTheCacheAfterWriting)


@mutant(name="RollingKVCache_slot_after_the_length_moved",
        bug="the write slots are computed after length moved on: position p lands in slot (p + n) % w",
        caught_by=["test_rolling_cache_keeps_position_p_in_slot_p_mod_window",
                   "test_rolling_cache_update_returns_the_held_window_then_the_chunk",
                   "test_rolling_cache_decoding_equals_the_full_banded_pass"], provides="RollingKVCache")
class RollingKVCache_SlotAfterLength(RollingKVCache):
    def update(self, k, v):
        w, n = self.window, k.shape[-2]
        slots = torch.arange(self.length - self.held, self.length) % w
        k_win, v_win = torch.cat([self.keys[:, :, slots], k], 2), torch.cat([self.values[:, :, slots], v], 2)
        self.length += n
        kept = min(n, w)
        new_slots = torch.arange(self.length + n - kept, self.length + n) % w  # the bug: length already moved
        self.keys[:, :, new_slots], self.values[:, :, new_slots] = k[:, :, n - kept :], v[:, :, n - kept :]
        return k_win, v_win


@mutant(name="RollingKVCache_keeps_every_position",
        bug="old positions are masked, never evicted: the storage grows with the sequence (O(length) memory)",
        caught_by=["test_rolling_cache_keeps_position_p_in_slot_p_mod_window"], provides="RollingKVCache")
class RollingKVCache_KeepsEverything(RollingKVCache):
    def update(self, k, v):
        first = max(0, self.length - self.window)
        self.keys = k if self.length == 0 else torch.cat([self.keys[:, :, : self.length], k], 2)
        self.values = v if self.length == 0 else torch.cat([self.values[:, :, : self.length], v], 2)
        self.length += k.shape[-2]
        return self.keys[:, :, first:], self.values[:, :, first:]
