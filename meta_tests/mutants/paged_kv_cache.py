"""Mutants of the paged KV cache and of paged attention."""

from __future__ import annotations

import torch
from einops import rearrange

from implementations.paged_kv_cache import PagedKVCache
from implementations.sdpa import scaled_dot_product_attention
from meta_tests.catalog import mutant


def buggy_paged_attention(bug: str):
    def paged_attention(q, key_blocks, value_blocks, block_tables, lengths):
        b, h, s, e = q.shape
        pb, width = key_blocks.shape[2], block_tables.shape[1]
        if bug == "logical_block":  # block x // pb of the pool, as if blocks were handed out in order
            block_tables = torch.arange(width, device=q.device).expand(b, width) % key_blocks.shape[0]
        k = rearrange(key_blocks[block_tables], "b mb g pb e -> b g (mb pb) e")
        v = rearrange(value_blocks[block_tables], "b mb g pb e -> b g (mb pb) e")
        position = torch.arange(width * pb, device=q.device)
        held = position < lengths[:, None]
        if bug != "values_past_the_length":
            k = torch.where(held[:, None, :, None], k, torch.zeros((), dtype=k.dtype))
            v = torch.where(held[:, None, :, None], v, torch.zeros((), dtype=v.dtype))
        query_position = lengths[:, None] - s + torch.arange(s, device=q.device)
        allowed = held[:, None, :] & (position <= query_position[..., None])
        return scaled_dot_product_attention(q, k, v, mask=allowed[:, None])

    return paged_attention


mutant(name="paged_attention_reads_the_logical_block",
       bug="reads block x // pb of the pool instead of block_tables[i, x // pb]", provides="paged_attention",
       caught_by=["test_paged_attention_equals_attention_over_contiguous_caches",
                  "test_paged_cache_decoding_equals_attention_over_contiguous_caches"])(buggy_paged_attention("logical_block"))
mutant(name="paged_attention_reads_values_past_the_length",
       bug="masks the scores past the length but multiplies the stale values of the last block: 0 * NaN "
       "(vLLM #641)", provides="paged_attention",
       caught_by=["test_paged_attention_equals_attention_over_contiguous_caches",
                  "test_paged_cache_decoding_equals_attention_over_contiguous_caches"])(
    buggy_paged_attention("values_past_the_length"))


@mutant(name="PagedKVCache_offset_one_past", bug="position x written at offset (x + 1) % pb of block x // pb "
        "(a 1-based position)", provides="PagedKVCache",
        caught_by=["test_paged_cache_writes_position_x_at_offset_x_mod_pb_of_block_table_x_div_pb",
                   "test_paged_cache_decoding_equals_attention_over_contiguous_caches"])
class PagedKVCache_OffsetOnePast(PagedKVCache):
    def append(self, seq_id, k, v):
        start, pb = self.lengths.get(seq_id, 0), self.block_size
        super().append(seq_id, k, v)  # takes the blocks; the writes are redone below, one slot late
        table, positions = torch.tensor(self.tables[seq_id]), torch.arange(start, start + k.shape[1])
        self.key_blocks[table[positions // pb], :, (positions + 1) % pb] = rearrange(k, "g n e -> n g e")
        self.value_blocks[table[positions // pb], :, (positions + 1) % pb] = rearrange(v, "g n e -> n g e")


@mutant(name="PagedKVCache_free_keeps_the_blocks", bug="free forgets the sequence but never returns its blocks",
        provides="PagedKVCache", caught_by=["test_paged_cache_free_returns_exactly_the_sequence_blocks"])
class PagedKVCache_FreeLeaks(PagedKVCache):
    def free(self, seq_id):
        del self.tables[seq_id], self.lengths[seq_id]


@mutant(name="PagedKVCache_new_block_every_append", bug="every append starts a new block, leaving the last "
        "one partly empty", provides="PagedKVCache", caught_by=["test_paged_cache_free_returns_exactly_the_sequence_blocks"])
class PagedKVCache_BlockPerAppend(PagedKVCache):
    def append(self, seq_id, k, v):
        start, pb, n = self.lengths.get(seq_id, 0), self.block_size, k.shape[1]
        table = self.tables.get(seq_id, []) + [self.free_blocks.pop() for _ in range(-(-n // pb))]
        for j in range(n):
            block, offset = table[len(table) - (-(-n // pb)) + j // pb], j % pb
            self.key_blocks[block, :, offset], self.value_blocks[block, :, offset] = k[:, j], v[:, j]
        self.tables[seq_id], self.lengths[seq_id] = table, start + n


@mutant(name="PagedKVCache_takes_blocks_until_it_runs_out",
        bug="takes blocks one at a time and fails with IndexError (pop from an empty list), keeping those taken",
        provides="PagedKVCache",
        caught_by=["test_paged_cache_rejects_an_append_past_its_free_blocks_and_changes_nothing"])
class PagedKVCache_PartialAllocation(PagedKVCache):
    def append(self, seq_id, k, v):
        table, pb = self.tables.setdefault(seq_id, []), self.block_size
        while len(table) * pb < self.lengths.get(seq_id, 0) + k.shape[1]:
            table.append(self.free_blocks.pop())
        super().append(seq_id, k, v)
