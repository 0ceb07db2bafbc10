"""Properties of sliding-window attention and its rolling KV cache. Spec: spec/sliding_window.py.

Cases are drawn from what the implementation offers (properties/options.py): biases, and RoPE with the
implementation's own RotaryEmbedding (its default base and pairing). Sizes stay tiny: window 1 .. 4, at
most 7 positions (so chunks longer than the window are common), h <= 4, even head width 2 or 4.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import OURS
from properties.options import Offers, draws_options, narrowed
from properties.plugin import CheckedModule, ComponentFailure, Implementation, describe_call
from properties.strategies import chunkings, seeds, tensor
from spec import sliding_window as spec
from spec.kv_cache import split_points
from spec.rotary_embedding import rotary_embedding

SWA = "SlidingWindowAttention"
CACHE = "RollingKVCache"
AXES = "b s d"


@dataclass(frozen=True)
class WindowCase:
    """One SlidingWindowAttention configuration: b batch, s positions, h heads, g KV heads, e head width,
    w window; ``rope`` is the RotaryEmbedding's (base, pairing), or None for no RoPE."""

    b: int
    s: int
    h: int
    g: int
    e: int
    w: int
    seed: int
    bias: bool = True
    rope: tuple[float, str] | None = None

    @property
    def d(self) -> int:
        return self.h * self.e

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, *, params=None) -> CheckedModule:
        """The implementation's module (and its own RotaryEmbedding, built as it offers)."""
        __tracebackhide__ = True
        config = {"d_model": self.d, "n_head": self.h, "n_kv_head": self.g, "window": self.w, "bias": self.bias}
        if self.rope is not None:
            config["rotary"] = impl.build("RotaryEmbedding", seed=self.seed, device=device, dtype=dtype,
                                          head_dim=self.e, base=self.rope[0], pairing=self.rope[1]).module
        return impl.build(SWA, seed=self.seed, device=device, dtype=dtype, params=params, **config)

    def inputs(self, device="cpu", dtype=torch.float64) -> Tensor:
        return tensor(self.seed + 1, self.b, self.s, self.d, dtype=dtype, device=device)

    def new_cache(self, impl: Implementation, device="cpu", dtype=torch.float64):
        return construct(impl, CACHE, batch_size=self.b, n_kv_head=self.g, head_dim=self.e, window=self.w,
                         dtype=dtype, device=device)

    def reference(self, module: CheckedModule, x: Tensor):
        params = module.canonical_numpy()
        rotary = None if self.rope is None else functools.partial(rotary_embedding, base=self.rope[0],
                                                                   pairing=self.rope[1])
        return spec.sliding_window_attention(params, x.detach().double().cpu().numpy(), n_head=self.h,
                                             n_kv_head=self.g, window=self.w, rotary=rotary)

    def __repr__(self) -> str:
        extra = ("" if self.bias else ", bias=False") + ("" if self.rope is None else
                                                          f", rotary(base={self.rope[0]:g}, pairing={self.rope[1]})")
        return f"SlidingWindowAttention(b={self.b}, s={self.s}, h={self.h}, g={self.g}, e={self.e}, window={self.w}{extra})"

    def _repr_pretty_(self, printer, cycle) -> None:
        """How Hypothesis prints a falsifying case: the configuration and its seed on one line."""
        printer.text(f"{self!r}, seed={self.seed}")


@draws_options(SWA, bias=lambda c: c.bias, rotary=lambda c: c.rope is not None)
@st.composite
def window_cases(draw, offers: Offers, *, rope_offers: Offers | None = None) -> WindowCase:
    """A configuration the implementation offers; RoPE (if drawn) with ``rope_offers``' default base and pairing."""
    h = draw(st.sampled_from([1, 2, 4]), label="h")
    rope = None
    if draw(offers.strategy("rotary"), label="rotary"):
        rope = (10000.0, "adjacent") if rope_offers is None else \
            (rope_offers.default("base"), rope_offers.default("pairing"))
    return WindowCase(
        b=draw(st.integers(1, 2), label="b"), s=draw(st.integers(1, 7), label="s"), h=h,
        g=draw(st.sampled_from([g for g in (1, 2, 4) if h % g == 0]), label="g"),
        e=2 * draw(st.integers(1, 2), label="e/2"), w=draw(st.integers(1, 4), label="window"),
        seed=draw(seeds(), label="seed"), bias=draw(offers.strategy("bias"), label="bias"), rope=rope,
    )


def cases(impl: Implementation) -> st.SearchStrategy[WindowCase]:
    """window_cases for ``impl``; RoPE only where it provides RotaryEmbedding (ours is never substituted)."""
    offers = impl.offers(SWA)
    if impl.provides("RotaryEmbedding"):
        return window_cases(offers, rope_offers=impl.offers("RotaryEmbedding"))
    return window_cases(narrowed(offers, rotary=False))


def construct(impl: Implementation, name: str, **config):
    """Build a helper object (a cache) of the implementation, reporting a failing constructor plainly."""
    __tracebackhide__ = True
    try:
        return impl.raw(name)(**config)
    except Exception as exc:
        raise ComponentFailure(f"{impl}: {describe_call(name, config)} raised {type(exc).__name__}: {exc}") from None


def checked_update(cache, k: Tensor, v: Tensor, who) -> tuple[Tensor, Tensor]:
    __tracebackhide__ = True
    try:
        return cache.update(k, v)
    except Exception as exc:
        raise ComponentFailure(f"{who}: {CACHE}.update raised {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# The mask and the banded pass


@pytest.mark.requires("sliding_window_mask")
@given(s=st.integers(1, 5), cached=st.integers(0, 3), window=st.integers(1, 7))
def test_sliding_window_mask_keeps_the_last_window_keys_of_each_query(impl, s, cached, window):
    """sliding_window_mask(s, t, window=w) lets query x (at position x + t - s) see exactly the keys
    x + t - s - w < y <= x + t - s: w keys, itself included, aligned bottom-right.

    Hint: keep j <= i and j > i - w (tril(t - s) & triu(t - s - w + 1)); triu(-w) keeps w + 1 keys, which
    is flash-attention's window_size=(w, 0), not Mistral's window w.
    """
    t = s + cached
    mask = impl.function("sliding_window_mask")(s, t, window=window)
    claim = f"sliding_window_mask({s}, {t}, window={window}) lets each query see its last {window} keys"
    assert_true(mask.dtype == torch.bool, claim=claim, detail=f"the mask is {mask.dtype}, not torch.bool",
                hint="return a boolean mask, True = may attend.")
    seen = mask.cpu().sum(-1).tolist()
    assert_equal(mask.cpu(), torch.from_numpy(spec.sliding_window_mask(s, t, window=window)), axes="s t", claim=claim,
                 hint=f"keys seen per query: {seen}; the window counts the query itself (i - w < j <= i).")


@pytest.mark.requires(SWA)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_sliding_window_attention_equals_attention_with_the_banded_causal_mask(impl, device, dtype, data):
    """The module equals the spec's float64 attention with the banded causal mask (query i sees keys
    i - w < j <= i), same weights, RoPE included (float32 and half precision by the error-ratio rule).

    Hint: the band counts the query itself: w keys, not w + 1 (torch.ones(s, s).tril().triu(-w) keeps w + 1).
    """
    case = data.draw(cases(impl), label="case")
    module = case.build(impl, device, dtype)
    x = case.inputs(device, dtype)
    baseline = None
    if dtype != torch.float64:
        params = {k: v.detach().clone() for k, v in module.canonical_state().items()}
        baseline = case.build(OURS, device, dtype, params=params)(x)
    assert_close(
        module(x), case.reference(module, x), baseline=baseline, axes=AXES,
        claim=f"{case} equals attention with the banded causal mask ({dtype})",
        hint="mask = tril(ones(s, s)) & triu(ones(s, s), 1 - window); GQA heads as GroupedQueryAttention.",
    )


# ---------------------------------------------------------------------------------------------------
# Decoding with the rolling cache


@pytest.mark.needs(cache=True)
@pytest.mark.requires(SWA, CACHE)
@given(data=st.data())
def test_rolling_cache_decoding_equals_the_full_banded_pass(impl, device, data):
    """For any split into chunks (one token at a time, and chunks longer than the window, included),
    decoding through a RollingKVCache of w positions gives the outputs of one full banded pass, with RoPE
    at absolute positions.

    Hint: attend over [held positions ++ chunk] before writing the chunk (a chunk longer than w needs its
    own keys the cache will not keep), keep position p in slot p mod w, and rotate at the absolute
    position cache.length + j, never at the slot.
    """
    case = data.draw(cases(impl), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    module = case.build(impl, device)
    x = case.inputs(device)
    cache = case.new_cache(impl, device)
    cached = torch.cat([module(x[:, a:b], cache=cache) for a, b in split_points(case.s, chunks)], dim=1)
    assert_close(
        cached, module(x), axes=AXES,
        claim=f"{case} decoded in chunks {chunks} through a rolling cache equals the full banded pass",
        hint="context = held window ++ chunk, mask bottom-right; write the last min(n, w) positions at p % w; "
        "RoPE offset = cache.length (absolute).",
    )


@st.composite
def rolling_runs(draw) -> tuple[int, int, int, int, list[int], int]:
    """(b, g, e, window, chunk lengths, seed) for the cache alone; chunks longer than the window included."""
    return (draw(st.integers(1, 2), label="b"), draw(st.integers(1, 2), label="g"), draw(st.integers(1, 2), label="e"),
            draw(st.integers(1, 3), label="window"),
            draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="chunks"), draw(seeds(), label="seed"))


def appended(seed: int, b: int, g: int, e: int, chunks: list[int]) -> tuple[Tensor, Tensor]:
    """The keys and values of the whole sequence, (b, g, sum(chunks), e) each, float64."""
    n = sum(chunks)
    return (tensor(seed, b, g, n, e, dtype=torch.float64, device="cpu"),
            tensor(seed + 1, b, g, n, e, dtype=torch.float64, device="cpu"))


@pytest.mark.requires(CACHE)
@given(run=rolling_runs())
def test_rolling_cache_update_returns_the_held_window_then_the_chunk(impl, run):
    """After L positions, update(k, v) with n new ones returns the keys and values of positions
    max(0, L - w) .. L + n - 1 in order (what the cache held, then the chunk), and length becomes L + n."""
    b, g, e, w, chunks, seed = run
    keys, values = appended(seed, b, g, e, chunks)
    cache = construct(impl, CACHE, batch_size=b, n_kv_head=g, head_dim=e, window=w, dtype=torch.float64, device="cpu")
    for (start, stop), n in zip(split_points(sum(chunks), chunks), chunks):
        k_win, v_win = checked_update(cache, keys[:, :, start:stop], values[:, :, start:stop], impl)
        first = max(0, start - w)
        claim = (f"a rolling cache (window {w}, b={b}, g={g}, e={e}) fed chunks {chunks} returns positions "
                 f"{first} .. {stop - 1} from the update at position {start}")
        hint = "read the held slots in position order ((L - held .. L - 1) % w), then append the chunk."
        assert_equal(k_win, keys[:, :, first:stop], axes="b g t e", claim=claim, hint=hint)
        assert_equal(v_win, values[:, :, first:stop], axes="b g t e", claim=claim, hint=hint)
        assert_true(cache.length == stop, claim=claim, detail=f"length is {cache.length}, {stop} positions were fed")


@pytest.mark.requires(CACHE)
@given(run=rolling_runs())
def test_rolling_cache_keeps_position_p_in_slot_p_mod_window(impl, run):
    """Whatever the length, the cache stores w slots, keys and values (b, g, w, e) each: memory O(w), not
    O(length); after every update the last min(length, w) positions sit in their slots p mod w (Mistral's
    rotating buffer)."""
    b, g, e, w, chunks, seed = run
    keys, values = appended(seed, b, g, e, chunks)
    cache = construct(impl, CACHE, batch_size=b, n_kv_head=g, head_dim=e, window=w, dtype=torch.float64, device="cpu")
    for start, stop in split_points(sum(chunks), chunks):
        checked_update(cache, keys[:, :, start:stop], values[:, :, start:stop], impl)
        claim = f"a rolling cache (window {w}) fed chunks {chunks} holds positions up to {stop - 1} in slots p mod {w}"
        shapes = tuple(tuple(getattr(getattr(cache, name, None), "shape", ())) for name in ("keys", "values"))
        assert_true(shapes == ((b, g, w, e),) * 2, claim=claim,
                    detail=f"keys {shapes[0]}, values {shapes[1]}; the spec's storage is (b, g, w, e) = {(b, g, w, e)}",
                    hint="allocate w slots once and overwrite the oldest; never concatenate.")
        held = torch.from_numpy(spec.held_positions(stop, w))
        slots = torch.from_numpy(spec.slot(held.numpy(), w))
        hint = "write position p at slot p % w (the slot of the oldest held position, which leaves the window)."
        assert_equal(cache.keys[:, :, slots], keys[:, :, held], axes="b g t e", claim=claim, hint=hint)
        assert_equal(cache.values[:, :, slots], values[:, :, held], axes="b g t e", claim=claim, hint=hint)
