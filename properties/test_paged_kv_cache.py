"""Properties of the paged KV cache and of paged attention. Spec: spec/paged_kv_cache.py.

Sizes stay tiny: up to 3 sequences of up to 7 positions, blocks of 1 .. 3 positions, h <= 4, e <= 3.
Every slot that holds no live sequence's position is filled with stale data (NaN where the
implementation offers ``nan_past_length``, else large finite garbage), as a freed sequence leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import OURS
from properties.options import Offers, draws_options
from properties.plugin import ComponentFailure, Implementation, describe_call
from properties.probes import expect_value_error
from properties.strategies import seeds, tensor
from spec import paged_kv_cache as spec

CACHE = "PagedKVCache"
ATTENTION = "paged_attention"
GARBAGE = 30.0  # finite stale data: a key this large takes the whole softmax if it is read


def stale(seed: int, *shape: int, nan: bool, dtype=torch.float64, device="cpu") -> Tensor:
    """What a freed block may hold: NaN, or large finite garbage."""
    if nan:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return tensor(seed, *shape, dtype=dtype, device=device, scale=GARBAGE)


# ---------------------------------------------------------------------------------------------------
# paged_attention on block tables drawn from any permutation of the pool


@dataclass(frozen=True)
class PagedCase:
    """b sequences of ``lengths`` in a pool of ``num_blocks`` blocks of pb positions, handed out in
    ``order`` (a permutation of the pool); s queries per sequence, h query heads, g KV heads, width e."""

    lengths: tuple[int, ...]
    s: int
    h: int
    g: int
    e: int
    pb: int
    num_blocks: int
    order: tuple[int, ...]
    padding: int  # the block that table entries past a sequence's blocks name (vLLM pads with block 0)
    nan: bool
    seed: int

    def tables(self) -> list[list[int]]:
        """Each sequence's blocks: consecutive pieces of ``order``."""
        out, start = [], 0
        for n in self.lengths:
            need = spec.blocks_needed(n, self.pb)
            out.append(list(self.order[start : start + need]))
            start += need
        return out

    def inputs(self, device="cpu", dtype=torch.float64):
        """(q, key_blocks, value_blocks, block_tables, lengths) and the contiguous caches (keys, values),
        each sequence's positions written through its table and every other slot stale."""
        g, pb, e = self.g, self.pb, self.e
        key_blocks = stale(self.seed + 2, self.num_blocks, g, pb, e, nan=self.nan, dtype=dtype, device=device)
        value_blocks = stale(self.seed + 3, self.num_blocks, g, pb, e, nan=self.nan, dtype=dtype, device=device)
        keys, values = [], []
        for i, (n, table) in enumerate(zip(self.lengths, self.tables())):
            k = tensor(self.seed + 10 + 2 * i, g, n, e, dtype=dtype, device=device)
            v = tensor(self.seed + 11 + 2 * i, g, n, e, dtype=dtype, device=device)
            for x in range(n):
                key_blocks[table[x // pb], :, x % pb], value_blocks[table[x // pb], :, x % pb] = k[:, x], v[:, x]
            keys.append(k)
            values.append(v)
        width = max(len(t) for t in self.tables())
        tables = torch.tensor([t + [self.padding] * (width - len(t)) for t in self.tables()], device=device)
        lengths = torch.tensor(self.lengths, device=device)
        q = tensor(self.seed + 1, len(self.lengths), self.h, self.s, e, dtype=dtype, device=device)
        return (q, key_blocks, value_blocks, tables, lengths), (keys, values)

    def __repr__(self) -> str:
        return (f"{len(self.lengths)} sequence(s) of lengths {list(self.lengths)}, s={self.s} queries each, h={self.h}, "
                f"g={self.g}, e={self.e}, block_size={self.pb}, tables {self.tables()} padded with block {self.padding} "
                f"in a pool of {self.num_blocks}, stale slots {'NaN' if self.nan else 'finite garbage'}")

    def _repr_pretty_(self, printer, cycle) -> None:
        """How Hypothesis prints a falsifying case: the configuration and its seed on one line."""
        printer.text(f"{self!r}, seed={self.seed}")


@draws_options(ATTENTION, chunked=lambda c: c.s > 1, nan_past_length=lambda c: c.nan)
@st.composite
def paged_cases(draw, offers: Offers) -> PagedCase:
    """Sequences of different lengths whose blocks come from a drawn permutation of the pool; with chunked,
    every sequence has 2 or more positions and s >= 2 of them are queries (s = 1 is the unchunked case)."""
    chunked = draw(offers.strategy("chunked"), label="chunked")
    lengths = tuple(draw(st.lists(st.integers(2 if chunked else 1, 7), min_size=1, max_size=3), label="lengths"))
    pb = draw(st.integers(1, 3), label="block_size")
    used = sum(spec.blocks_needed(n, pb) for n in lengths)
    num_blocks = used + draw(st.integers(0, 2), label="spare_blocks")
    g = draw(st.integers(1, 2), label="g")
    return PagedCase(
        lengths=lengths, s=draw(st.integers(2, min(lengths)), label="s") if chunked else 1,
        h=g * draw(st.integers(1, 2), label="h/g"), g=g, e=draw(st.integers(1, 3), label="e"), pb=pb,
        num_blocks=num_blocks, order=tuple(draw(st.permutations(range(num_blocks)), label="order")),
        padding=draw(st.integers(0, num_blocks - 1), label="padding"),
        nan=draw(offers.strategy("nan_past_length"), label="nan_past_length"), seed=draw(seeds(), label="seed"),
    )


def reference(q: Tensor, keys: list[Tensor], values: list[Tensor]):
    as64 = lambda ts: [t.detach().double().cpu().numpy() for t in ts]  # noqa: E731
    return spec.contiguous_attention(q.detach().double().cpu().numpy(), as64(keys), as64(values))


@pytest.mark.requires(ATTENTION)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_paged_attention_equals_attention_over_contiguous_caches(impl, device, dtype, data):
    """For sequences of different lengths in one batch, with blocks handed out in any order, paged
    attention equals causal attention of each sequence's last s queries over its own contiguous cache;
    stale slots (the rest of a last block, padding entries of a table, spare blocks) never reach the
    output, NaN included (float32 and half precision by the error-ratio rule).

    Hint: read block block_tables[i, x // pb] at offset x % pb (the table, not the logical block x // pb), stop
    at lengths[i], and zero stale values before weights @ values: 0 * NaN = NaN (vLLM issue #641).
    """
    case = data.draw(paged_cases(impl.offers(ATTENTION)), label="case")
    args, (keys, values) = case.inputs(device, dtype)
    out = impl.function(ATTENTION)(*args)
    baseline = None if dtype == torch.float64 else OURS.function(ATTENTION)(*args)
    assert_close(
        out, reference(args[0], keys, values), baseline=baseline, axes="b h s e",
        claim=f"paged attention over {case} equals attention over the contiguous caches ({dtype})",
        hint="gather block_tables[i, x // pb] at offset x % pb for x < lengths[i] only, and zero what lies past the "
        "length: a masked (zero) weight times a stale NaN value is NaN.",
    )


# ---------------------------------------------------------------------------------------------------
# The cache: sequences appended in turns, freed, their blocks reused


@dataclass(frozen=True)
class CacheRun:
    """Operations on a cache of ``num_blocks`` blocks of pb positions: ("append", slot, n) appends n positions
    to the sequence in slot 0 .. 2, ("free", slot, 0) frees it (the slot then starts a new sequence)."""

    ops: tuple[tuple[str, int, int], ...]
    pb: int
    g: int
    e: int
    num_blocks: int
    nan: bool
    seed: int

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.pb}, n_kv_head={self.g}, head_dim={self.e}) "
                f"after {list(self.ops)}")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(f"{self!r}, stale slots {'NaN' if self.nan else 'finite garbage'}, seed={self.seed}")


def peak_blocks(ops, pb: int) -> int:
    """The most blocks the operations hold at once."""
    lengths, peak = [0, 0, 0], 0
    for op, slot, n in ops:
        lengths[slot] = lengths[slot] + n if op == "append" else 0
        peak = max(peak, sum(spec.blocks_needed(m, pb) for m in lengths))
    return peak


def meaningful(ops):
    """The operations without a free of a slot that holds no sequence (it would do nothing)."""
    started, kept = set(), []
    for op, slot, n in ops:
        if op == "append":
            started.add(slot)
        elif slot not in started:
            continue
        else:
            started.discard(slot)
        kept.append((op, slot, n))
    return tuple(kept)


@st.composite
def cache_runs(draw, offers: Offers | None = None) -> CacheRun:
    """Appends to up to three sequences in turns and frees, ending with an append; the pool holds the peak
    plus 0 .. 2 spare blocks. Stale data is NaN where ``offers`` (paged_attention's) allows it."""
    op = st.one_of(st.tuples(st.just("append"), st.integers(0, 2), st.integers(1, 4)),
                   st.tuples(st.just("free"), st.integers(0, 2), st.just(0)))
    ops = (*draw(st.lists(op, max_size=6), label="ops"), ("append", 0, draw(st.integers(1, 4), label="last")))
    ops = meaningful(ops)
    pb = draw(st.integers(1, 3), label="block_size")
    nan = draw(offers.strategy("nan_past_length"), label="nan_past_length") if offers is not None else False
    return CacheRun(ops=ops, pb=pb, g=draw(st.integers(1, 2), label="g"), e=draw(st.integers(1, 2), label="e"),
                    num_blocks=peak_blocks(ops, pb) + draw(st.integers(0, 2), label="spare_blocks"), nan=nan,
                    seed=draw(seeds(), label="seed"))


def call(cache, method: str, *args, who):
    """cache.method(*args), a failure of the implementation if it raises."""
    __tracebackhide__ = True
    try:
        return getattr(cache, method)(*args)
    except Exception as exc:
        raise ComponentFailure(f"{who}: {CACHE}.{method}{tuple(args)!r:.60} raised {type(exc).__name__}: {exc}") from None


def new_cache(impl: Implementation, **config):
    __tracebackhide__ = True
    try:
        return impl.raw(CACHE)(**config)
    except Exception as exc:
        raise ComponentFailure(f"{impl}: {describe_call(CACHE, config)} raised {type(exc).__name__}: {exc}") from None


def replay(impl: Implementation, run: CacheRun, check=None):
    """Run the operations on a fresh cache whose storage starts stale, refilling freed blocks with stale
    data; ``check(cache, live, freed)`` after each operation, where live maps seq_id -> (keys, values) and
    freed is the block table of the sequence just freed (else None). Returns (cache, live)."""
    cache = new_cache(impl, num_blocks=run.num_blocks, block_size=run.pb, n_kv_head=run.g, head_dim=run.e,
                      dtype=torch.float64, device="cpu")
    shape = (run.num_blocks, run.g, run.pb, run.e)
    with torch.no_grad():
        cache.key_blocks.copy_(stale(run.seed + 1, *shape, nan=run.nan))
        cache.value_blocks.copy_(stale(run.seed + 2, *shape, nan=run.nan))
    ids, live, fresh = [0, 1, 2], {}, 3
    for step, (op, slot, n) in enumerate(run.ops):
        seq, freed = ids[slot], None
        if op == "append":
            k = tensor(run.seed + 10 + 2 * step, run.g, n, run.e, dtype=torch.float64, device="cpu")
            v = tensor(run.seed + 11 + 2 * step, run.g, n, run.e, dtype=torch.float64, device="cpu")
            call(cache, "append", seq, k, v, who=impl)
            old_k, old_v = live.get(seq, (k[:, :0], v[:, :0]))
            live[seq] = (torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1))
        elif seq in live:
            freed = list(call(cache, "block_table", seq, who=impl))
            call(cache, "free", seq, who=impl)
            del live[seq]
            ids[slot], fresh = fresh, fresh + 1
            with torch.no_grad():  # what a freed block holds until it is written again
                cache.key_blocks[freed] = stale(run.seed + 3 + step, len(freed), *shape[1:], nan=run.nan)
                cache.value_blocks[freed] = stale(run.seed + 4 + step, len(freed), *shape[1:], nan=run.nan)
        if check is not None:
            check(cache, live, freed)
    return cache, live


@pytest.mark.requires(CACHE, ATTENTION)
@given(data=st.data())
def test_paged_cache_decoding_equals_attention_over_contiguous_caches(impl, data):
    """Sequences appended in turns to one PagedKVCache, some freed and their blocks reused (holding stale
    data), then decoded together with paged_attention through their block tables, give the outputs of
    attention over each sequence's own contiguous cache.

    Hint: append writes position x at offset x % pb of the x // pb-th block of the sequence's table, taking a
    new block only when the last one is full; free returns the blocks, whose stale data must never be read.
    """
    offers = impl.offers(ATTENTION)
    run = data.draw(cache_runs(offers), label="run")
    cache, live = replay(impl, run)
    seq_ids = sorted(live)
    lengths = [live[i][0].shape[1] for i in seq_ids]
    s = data.draw(st.integers(1, min(lengths)), label="s") if offers.offers("chunked", True) else 1
    h = run.g * data.draw(st.integers(1, 2), label="h/g")
    tables = [list(call(cache, "block_table", i, who=impl)) for i in seq_ids]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # padded as vLLM does: block 0
    q = tensor(run.seed, len(seq_ids), h, s, run.e, dtype=torch.float64, device="cpu")
    out = impl.function(ATTENTION)(q, cache.key_blocks, cache.value_blocks, block_tables, torch.tensor(lengths))
    assert_close(
        out, reference(q, [live[i][0] for i in seq_ids], [live[i][1] for i in seq_ids]), axes="b h s e",
        claim=f"decoding {run} (lengths {lengths}, tables {tables}, s={s}) equals attention over the contiguous caches",
        hint="write position x at block table[x // pb], offset x % pb; read nothing past a sequence's length.",
    )


@pytest.mark.requires(CACHE)
@given(run=cache_runs())
def test_paged_cache_writes_position_x_at_offset_x_mod_pb_of_block_table_x_div_pb(impl, run):
    """After every append and free, each live sequence's positions read back through its block table,
    position x at key_blocks[table[x // pb], :, x % pb], are exactly what was appended, keys and values."""

    def check(cache, live, _):
        for seq, (k, v) in live.items():
            table, n = call(cache, "block_table", seq, who=impl), k.shape[1]
            claim = f"{run}: sequence {seq}'s {n} positions read back through its table {list(table)}"
            hint = "position x goes to offset x % block_size of block table[x // block_size]."
            for blocks, want in ((cache.key_blocks, k), (cache.value_blocks, v)):
                got = torch.from_numpy(spec.gather_sequence(blocks.detach().cpu().numpy(), table, n))
                assert_equal(got, want, axes="g t e", claim=claim, hint=hint)

    replay(impl, run, check)


@pytest.mark.requires(CACHE)
@given(run=cache_runs())
def test_paged_cache_free_returns_exactly_the_sequence_blocks(impl, run):
    """After every operation each live sequence of length L owns ceil(L / pb) blocks of the pool, no block is
    owned twice, and the free count is the rest; freeing a sequence returns exactly its blocks."""
    before = {"free": run.num_blocks}

    def check(cache, live, freed):
        tables = {seq: list(call(cache, "block_table", seq, who=impl)) for seq in live}
        owned = [b for t in tables.values() for b in t]
        free = int(cache.num_free_blocks)
        claim = f"{run}: sequences own ceil(length / {run.pb}) distinct blocks and the rest are free"
        want = {seq: spec.blocks_needed(k.shape[1], run.pb) for seq, (k, _) in live.items()}
        assert_true({seq: len(t) for seq, t in tables.items()} == want, claim=claim,
                    detail=f"tables {tables} for lengths { {s: k.shape[1] for s, (k, _) in live.items()} }",
                    hint="take a new block only when the sequence's last block is full.")
        assert_true(len(set(owned)) == len(owned) and set(owned) <= set(range(run.num_blocks)), claim=claim,
                    detail=f"tables {tables} share or invent blocks", hint="hand out each free block once.")
        assert_true(free + len(owned) == run.num_blocks, claim=claim,
                    detail=f"{free} free + {len(owned)} owned != {run.num_blocks} blocks",
                    hint="free must put every block of the sequence back on the free list.")
        if freed is not None:
            assert_true(free == before["free"] + len(freed), claim=claim,
                        detail=f"freeing a sequence of {len(freed)} blocks {freed} took the free count from "
                        f"{before['free']} to {free}", hint="free must put every block of the sequence back.")
        before["free"] = free

    replay(impl, run, check)


@pytest.mark.requires(CACHE)
@given(pb=st.integers(1, 3), num_blocks=st.integers(1, 4), held=st.integers(0, 12), extra=st.integers(1, 6),
       same_sequence=st.booleans(), seed=seeds())
def test_paged_cache_rejects_an_append_past_its_free_blocks_and_changes_nothing(
        impl, pb, num_blocks, held, extra, same_sequence, seed):
    """An append that needs more blocks than are free raises ValueError and changes nothing: the free
    count, the sequences' tables and lengths, and the stored keys stay as they were."""
    held = min(held, num_blocks * pb)
    cache = new_cache(impl, num_blocks=num_blocks, block_size=pb, n_kv_head=1, head_dim=1, dtype=torch.float64,
                      device="cpu")
    if held:
        k = tensor(seed, 1, held, 1, dtype=torch.float64, device="cpu")
        call(cache, "append", 0, k, k.clone(), who=impl)
    free = int(cache.num_free_blocks)
    table = list(call(cache, "block_table", 0, who=impl)) if held else []
    seq = 0 if same_sequence and held else 1
    start = held if seq == 0 else 0
    n = (spec.blocks_needed(start, pb) + free) * pb - start + extra  # one position more than the free blocks hold
    stored = cache.key_blocks.clone()
    k = tensor(seed + 1, 1, n, 1, dtype=torch.float64, device="cpu")
    claim = (f"a PagedKVCache(num_blocks={num_blocks}, block_size={pb}) with {free} free block(s) rejects {n} more "
             f"positions for sequence {seq} (holding {start}) with ValueError")
    expect_value_error(lambda: cache.append(seq, k, k.clone()), claim=claim, what="append returned",
                       hint="check the blocks needed against the free list before taking any, and raise ValueError.")
    after = (int(cache.num_free_blocks), list(call(cache, "block_table", 0, who=impl)) if held else [],
             call(cache, "length", 0, who=impl) if held else 0)
    assert_true(after == (free, table, held), claim=claim + ", changing nothing",
                detail=f"(free blocks, table of sequence 0, its length) went from {(free, table, held)} to {after}",
                hint="take no block before knowing the whole request fits.")
    assert_equal(cache.key_blocks, stored, axes="nb g pb e", claim=claim + ", changing nothing",
                 hint="write nothing before knowing the whole request fits.")
