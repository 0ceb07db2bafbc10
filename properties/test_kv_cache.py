"""Properties of the KV cache and of cached attention. Spec: spec/kv_cache.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.assertions import assert_close, assert_equal, assert_true
from properties.attention_cases import attention_cases
from properties.strategies import attention_configs
from properties.plugin import ComponentFailure, Implementation, describe_call
from properties.probes import expect_value_error
from properties.strategies import chunkings, seeds, tensor
from spec.kv_cache import cache_storage_shape, split_points

pytestmark = pytest.mark.requires("KVCache")
CACHED_MODULES = ["MultiHeadAttention", "MultiQueryAttention", "GroupedQueryAttention"]
ROPE = [pytest.param(False, id="no_rope"),
        pytest.param(True, id="rope", marks=[pytest.mark.requires("RotaryEmbedding"), pytest.mark.needs(rotary=True)])]


def new_cache(impl: Implementation, **config):
    """Build the implementation's KVCache, reporting a failing constructor plainly."""
    __tracebackhide__ = True
    try:
        return impl.raw("KVCache")(**config)
    except Exception as exc:
        raise ComponentFailure(f"{impl}: {describe_call('KVCache', config)} raised {type(exc).__name__}: {exc}") from None


def update(cache, k, v, who):
    __tracebackhide__ = True
    try:
        return cache.update(k, v)
    except Exception as exc:
        raise ComponentFailure(f"{who}: KVCache.update raised {type(exc).__name__}: {exc}") from None


def cached_and_full(impl, case, chunks, device, rope):
    c = case.cfg
    rotary = impl.raw("RotaryEmbedding")(head_dim=c.e) if rope else None
    module = case.build(impl, device, **({"rotary": rotary} if rope else {}))
    x, _ = case.inputs(device)
    full = module(x, causal=True)
    cache = new_cache(impl, batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=c.s, dtype=x.dtype, device=device)
    pieces = [module(x[:, a:b], causal=True, cache=cache) for a, b in split_points(c.s, chunks)]
    return torch.cat(pieces, dim=1), full, cache


@st.composite
def cached_runs(draw, offers):
    case = draw(attention_cases(offers, max_len=7, even_head_dim=True, causal=True, masks=False), label="case")
    return case, draw(chunkings(case.cfg.s), label="chunks")


@pytest.mark.needs(cache=True, causal=True)
@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("component", CACHED_MODULES)
@given(data=st.data())
def test_cached_attention_equals_the_full_pass(impl, device, component, rope, data):
    """For any split into a prefill and later chunks (one token at a time included), causal attention with
    a KV cache gives the outputs of one full causal pass, with and without RoPE.

    Hint: new keys go after the cached ones (the position axis), RoPE rotates them at their true positions
    (offset = cache length), and the chunk's causal mask aligns bottom-right: its query j sits at position
    cache.length + j. PyTorch's is_causal=True aligns top-left when the chunk is shorter than the keys.
    """
    case, chunks = data.draw(cached_runs(impl.offers(component)), label="run")
    cached, full, _ = cached_and_full(impl, case, chunks, device, rope)
    assert_close(
        cached, full, axes="b s d",
        claim=f"cached {case} equals the full causal pass (chunks {chunks}, rope={rope})",
        hint="append along the position axis; rotate at offset = cache length; bottom-right causal alignment.",
    )


@given(cfg=attention_configs(heads="gqa", max_len=6), seed=seeds(),
       chunks=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_kv_cache_update_returns_everything_appended(impl, device, cfg, seed, chunks):
    """update(k, v) returns every key and value appended so far, in order, and length counts them."""
    c = cfg
    cache = new_cache(impl, batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=sum(chunks),
                      dtype=torch.float64, device=device)
    ks, vs = [], []
    for i, n in enumerate(chunks):
        ks.append(tensor(seed + 2 * i, c.b, c.g, n, c.e, dtype=torch.float64, device=device))
        vs.append(tensor(seed + 2 * i + 1, c.b, c.g, n, c.e, dtype=torch.float64, device=device))
        k_all, v_all = update(cache, ks[-1], vs[-1], impl)
        claim = f"after appending chunks {chunks[: i + 1]}, the cache returns them all in order ({c})"
        assert_equal(k_all, torch.cat(ks, dim=2), axes="b g t e", claim=claim,
                     hint="append on the position axis (dim 2 of (b, g, t, e)) and return the filled prefix.")
        assert_equal(v_all, torch.cat(vs, dim=2), axes="b g t e", claim=claim, hint="values like keys.")
        assert_true(cache.length == sum(chunks[: i + 1]), claim=claim,
                    detail=f"length is {cache.length}, {sum(chunks[: i + 1])} positions were appended")


@given(cfg=attention_configs(heads="gqa"), capacity=st.integers(1, 8), seed=seeds())
def test_kv_cache_holds_n_kv_head_heads(impl, cfg, capacity, seed):
    """The cache stores keys and values as (b, n_kv_head, capacity, head_dim): n_head / n_kv_head times
    less than an MHA cache, i.e. 2 * n_kv_head * head_dim numbers per token and layer. A cache that
    allocates its storage lazily is read after its first update."""
    c = cfg
    cache = new_cache(impl, batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=capacity, dtype=torch.float64,
                      device="cpu")
    if not all(isinstance(getattr(cache, name, None), torch.Tensor) for name in ("keys", "values")):
        one = tensor(seed, c.b, c.g, 1, c.e, dtype=torch.float64, device="cpu")  # lazy: allocate now
        update(cache, one, one.clone(), impl)
    want = cache_storage_shape(batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=capacity)
    shape = lambda name: tuple(getattr(getattr(cache, name, None), "shape", ()))  # () when missing or None
    got = (shape("keys"), shape("values"))
    assert_true(
        got == (want, want),
        claim=f"the KV cache stores (b, n_kv_head, capacity, head_dim) = {want} for keys and values ({c})",
        detail=f"keys {got[0]}, values {got[1]}",
        hint="cache the KV heads before repeating them for the query groups: that is where MQA/GQA save memory.",
    )


@given(cfg=attention_configs(heads="mha", max_len=4), seed=seeds(), extra=st.integers(1, 3))
def test_kv_cache_rejects_appending_past_its_capacity(impl, cfg, seed, extra):
    """Appending more positions than the capacity raises ValueError; nothing is silently dropped or grown."""
    c = cfg
    cache = new_cache(impl, batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=c.s, dtype=torch.float64, device="cpu")
    k = tensor(seed, c.b, c.g, c.s + extra, c.e, dtype=torch.float64, device="cpu")
    expect_value_error(
        lambda: cache.update(k, k.clone()),
        claim=f"a KV cache of capacity {c.s} rejects {c.s + extra} positions with ValueError",
        hint="check length + new <= capacity before writing, and raise ValueError with the numbers.",
        what="update returned a",
    )


@pytest.mark.needs(cache=True, causal=True)
@pytest.mark.parametrize("component", CACHED_MODULES)
@given(data=st.data())
def test_kv_cache_reset_forgets_the_previous_sequence(impl, component, data):
    """After reset(), decoding a new sequence with the same cache equals decoding it with a fresh one."""
    case, chunks = data.draw(cached_runs(impl.offers(component)), label="run")
    other = data.draw(seeds(), label="other_sequence_seed")
    c = case.cfg
    module = case.build(impl)
    x, _ = case.inputs()
    y = tensor(other, c.b, c.s, c.d, dtype=x.dtype, device="cpu")
    cache = new_cache(impl, batch_size=c.b, n_kv_head=c.g, head_dim=c.e, capacity=c.s, dtype=x.dtype, device="cpu")
    for a, b in split_points(c.s, chunks):
        module(x[:, a:b], causal=True, cache=cache)
    cache.reset()
    reused = torch.cat([module(y[:, a:b], causal=True, cache=cache) for a, b in split_points(c.s, chunks)], dim=1)
    assert_close(
        reused, module(y, causal=True), axes="b s d",
        claim=f"after reset, a reused cache decodes a new sequence like a fresh one ({case}, chunks {chunks})",
        hint="reset must set the length back to 0 (the storage may stay).",
    )
