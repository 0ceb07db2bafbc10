"""The paged KV cache (vLLM, Kwon et al. 2023, "PagedAttention") and attention over it.

Signatures (constructors are keyword-only)
-------------------------------------------
    PagedKVCache(*, num_blocks, block_size, n_kv_head, head_dim, dtype=torch.float32, device="cpu")
        .key_blocks, .value_blocks    storage (nb, g, pb, e), shared by every sequence
        .append(seq_id, k, v)         k, v (g, n, e): the sequence's next n positions (a new seq_id starts one)
        .free(seq_id)                 its blocks go back to the free list; the sequence is forgotten
        .block_table(seq_id) -> list[int]    physical block of each logical block, in order
        .length(seq_id) -> int               positions the sequence holds
        .num_free_blocks -> int
    paged_attention(q, key_blocks, value_blocks, block_tables, lengths) -> Tensor

Shapes (the glossary of spec/__init__.py, plus this family's nb, pb and mb)
----------------------------------------------------------------------------
    nb = num_blocks          physical blocks of the pool
    pb = block_size          positions per block
    mb                       width of a block table (blocks of the longest sequence)
    q             (b, h, s, e)    the last s positions of each of b sequences (decoding: s = 1)
    key_blocks    (nb, g, pb, e);  value_blocks (nb, g, pb, e_v)
    block_tables  (b, mb) int64   row i: sequence i's physical blocks in logical order
    lengths       (b,) int64      positions of each sequence, s <= lengths[i] <= mb * pb
    out           (b, h, s, e_v), the dtype and device of q

Math
----
Position x of a sequence with block table T lives in logical block x // pb at offset x % pb, i.e.
    key(x) = key_blocks[T[x // pb], :, x % pb]        (g, e)
A sequence of length L owns ceil(L / pb) blocks; its contiguous cache is K = [key(0), .., key(L - 1)]
(g, L, e), and likewise V. Paged attention of sequence i is attention over that contiguous cache:
    out[i] = scaled_dot_product_attention(q[i], K_i, V_i, causal=True)        (spec/sdpa.py)
bottom-right causal, so query j of the s sits at position L_i - s + j (decoding: the last position sees
every key). GQA heads as spec/sdpa.py: query head i reads KV head i // (h // g).
``append(seq_id, k, v)`` first takes ceil((L + n) / pb) - ceil(L / pb) blocks from the free list (all or
none), then writes position L + j at key_blocks[T[(L + j) // pb], :, (L + j) % pb]. ``free`` returns exactly
the sequence's blocks: the free count goes back up by ceil(L / pb), and no block is ever owned twice.

Conventions (pinned, with the reason)
-------------------------------------
* Blocks may be handed out in any order: a block table is any list of distinct free blocks. Attention
  reads block T[x // pb], never block x // pb (the logical index).
* Positions past a sequence's length are never read into the output: the rest of its last block, the
  blocks that table entries past ceil(L / pb) name (padding: any block of the pool; vLLM pads with block
  0, another sequence's) and blocks freed by earlier sequences may hold anything, NaN included. Masking
  the scores is not enough: 0 * NaN = NaN in weights @ values (vLLM issue #641, fixed in PR #936 by
  zeroing the values past the length).
* Storage layout (nb, g, pb, e): a block is a (g, pb, e) slice, one KV cache's (b, g, t, e) page; vLLM's
  kernels use other layouts (keys split by x = 16 bytes), the same addressing.
* An append that needs more blocks than are free raises ValueError before changing anything: no block
  taken, nothing written (the caller preempts or swaps a sequence out; nothing is silently overwritten).
* q attends only to its own sequence's keys: batch rows never mix.

Options (declarable; properties/options.py)
-------------------------------------------
* ``chunked`` (input): q may hold s > 1 queries per sequence (the last s positions, causal); False:
  a decode-only kernel, s = 1 (vLLM's paged_attention v1/v2 kernels).
* ``nan_past_length`` (input): stale slots past the lengths may hold NaN (default); False: they hold
  finite garbage only, for a kernel that masks scores but multiplies masked weights by stale values.

Canonical parameters
--------------------
None.

Properties (properties/test_paged_kv_cache.py)
----------------------------------------------
paged attention equals attention over the contiguous per-sequence caches, for sequences of different
lengths in one batch, block tables drawn from any permutation of the pool, stale data (NaN) in every slot
no sequence owns (float64; float32 by the error-ratio rule); decoding through a PagedKVCache, with
sequences appended in turns and freed (their blocks reused, filled with garbage), equals attention over
the contiguous caches; append writes position x at offset x % pb of block T[x // pb]; a sequence owns
ceil(L / pb) blocks, none owned twice, and freeing returns exactly its blocks; an append past the free
blocks raises ValueError and changes nothing.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from spec.registry import Component, boolean, component
from spec.sdpa import scaled_dot_product_attention

PAGED_KV_CACHE = component(
    Component(
        name="PagedKVCache",
        kind="class",
        family="paged_kv_cache",
        summary="a pool of fixed-size KV blocks (nb, g, pb, e) shared by sequences through block tables",
    )
)
PAGED_ATTENTION = component(
    Component(
        name="paged_attention",
        kind="function",
        family="paged_kv_cache",
        summary="attention of each sequence's last s queries over its blocks, read through its block table",
        output_shape=lambda q, key_blocks, value_blocks, *args, **kwargs: (*q.shape[:-1], value_blocks.shape[-1]),
        options=(
            boolean("chunked", "q holds s > 1 queries per sequence, the last s positions, causal (False: s = 1)"),
            boolean("nan_past_length", "slots past a sequence's length may hold NaN, which must not reach the "
                    "output (False: finite garbage only)"),
        ),
    )
)


def blocks_needed(length: int, block_size: int) -> int:
    """ceil(length / pb): the blocks a sequence of ``length`` positions owns."""
    return -(-length // block_size)


def block_and_offset(position: int | np.ndarray, block_size: int):
    """(logical block, offset in it) of a position: (x // pb, x % pb)."""
    return np.asarray(position) // block_size, np.asarray(position) % block_size


def gather_sequence(blocks: np.ndarray, table, length: int) -> np.ndarray:
    """The contiguous cache (g, length, e) of a sequence: position x read at blocks[table[x // pb], :, x % pb]."""
    blocks = np.asarray(blocks, dtype=np.float64)
    logical, offset = block_and_offset(np.arange(length), blocks.shape[2])
    # Advanced indices on axes 0 and 2 put the position axis first: (length, g, e).
    return rearrange(blocks[np.asarray(table)[logical], :, offset], "t g e -> g t e")


def contiguous_attention(q, keys: list, values: list) -> np.ndarray:
    """The float64 reference: sequence i's last s queries q[i] (h, s, e) over its contiguous cache keys[i]
    (g, L_i, e), values[i] (g, L_i, e_v), causal bottom-right; (b, h, s, e_v)."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([scaled_dot_product_attention(q[i : i + 1], np.asarray(k)[None], np.asarray(v)[None],
                                                        causal=True) for i, (k, v) in enumerate(zip(keys, values))])

