"""Properties of multi-head latent attention (MLA) and its latent cache.
Spec: spec/multi_head_latent_attention.py.

Every case is drawn from what the implementation offers (properties/options.py): query compression or
not (q_rank), the latent norms, biases, the decoupled RoPE part (with the implementation's own
RotaryEmbedding, its base and pairing as it offers them), the absorbed inference form, masks and the
causal flag. Masks never leave a query without an allowed key. Sizes stay tiny: d <= 8, h <= 3, e <= 3,
kv_rank 2 .. 5, rope_dim 2 or 4, at most 6 positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import no_empty_rows
from properties.options import Offers, draws_options, narrowed
from properties.plugin import CheckedModule, ComponentFailure, Implementation, backward, describe_call
from properties.probes import assert_parameters_get_finite_gradients
from properties.strategies import Mask, boolean_masks, chunkings, padding_masks, seeds, tensor
from spec import multi_head_latent_attention as spec
from spec.attention import attention as reference_attention
from spec.kv_cache import split_points
from spec.rotary_embedding import rotary_embedding

MLA = "MultiHeadLatentAttention"
OURS = Implementation("ours", implementations)
AXES = "b s d"
pytestmark = pytest.mark.requires(MLA)


@dataclass(frozen=True)
class MLACase:
    """One MLA configuration and call. Sizes: b batch, s positions, d model width, h heads, e head width,
    l kv_rank, m = lq q_rank (None: no query compression), r rope_dim (0: no RoPE part)."""

    b: int
    s: int
    d: int
    h: int
    e: int
    l: int
    r: int
    seed: int
    m: int | None = None
    kv_norm: bool = True
    q_norm: bool = True
    bias: bool = False
    absorbed: bool = False
    causal: bool = False
    mask: np.ndarray | None = None  # (b, 1, s, s), True = may attend
    rope: tuple[float, str] = (10000.0, "adjacent")  # the RotaryEmbedding's (base, pairing)

    @property
    def ctor(self) -> dict[str, Any]:
        """The constructor's keywords (build drops the options the implementation has built in);
        rope_dim only with the RoPE part, which also passes ``rotary``."""
        kw = {"d_model": self.d, "n_head": self.h, "head_dim": self.e, "kv_rank": self.l, "q_rank": self.m,
              "kv_norm": self.kv_norm, "q_norm": self.q_norm, "bias": self.bias}
        return kw | ({"rope_dim": self.r} if self.r else {})

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, *, params=None, **kw) -> CheckedModule:
        __tracebackhide__ = True
        config = {**self.ctor, **kw}
        if config.get("rope_dim"):  # the implementation's own RotaryEmbedding, built as it offers
            config["rotary"] = impl.build("RotaryEmbedding", seed=self.seed, device=device, dtype=dtype,
                                          head_dim=config["rope_dim"], base=self.rope[0], pairing=self.rope[1]).module
        return impl.build(MLA, seed=self.seed, device=device, dtype=dtype, params=params, **config)

    def inputs(self, device="cpu", dtype=torch.float64, *, s: int | None = None, seed: int = 1) -> Tensor:
        return tensor(self.seed + seed, self.b, s or self.s, self.d, dtype=dtype, device=device)

    def call(self, module, x: Tensor, *, mask=None, causal: bool | None = None, absorbed: bool | None = None,
             cache=None) -> Tensor:
        """Call with ``causal`` explicit (the wrapper drops it where built in); a numpy or tensor mask
        broadcastable to (b, h, s, t); only a given mask or cache, and absorbed=True, are passed."""
        __tracebackhide__ = True
        kwargs: dict[str, Any] = {"causal": self.causal if causal is None else causal}
        if self.absorbed if absorbed is None else absorbed:
            kwargs["absorbed"] = True  # without it: the naive form
        if mask is not None:
            kwargs["mask"] = torch.as_tensor(np.asarray(mask), device=x.device)
        if cache is not None:
            kwargs["cache"] = cache
        return module(x, **kwargs)

    def rotary(self):
        """The reference RoPE ``rotary(a, offset=o)`` on (b, h, s, r) arrays, as the RotaryEmbedding does it."""
        return functools.partial(rotary_embedding, base=self.rope[0], pairing=self.rope[1])

    def reference(self, params: dict[str, Tensor], x: Tensor, *, mask=None, causal: bool | None = None) -> np.ndarray:
        return spec.multi_head_latent_attention(
            numpy(params), x.detach().double().cpu().numpy(), n_head=self.h, head_dim=self.e, rope_dim=self.r,
            rotary=self.rotary(), mask=None if mask is None else np.asarray(mask),
            causal=self.causal if causal is None else causal,
        )

    def __repr__(self) -> str:
        opts = [f"q_rank={self.m}", f"rope_dim={self.r}"]
        opts += [] if self.kv_norm else ["kv_norm=False"]
        opts += [] if self.q_norm or self.m is None else ["q_norm=False"]
        opts += ["bias=True"] if self.bias else []
        opts += [f"rotary(base={self.rope[0]:g}, pairing={self.rope[1]})"] if self.r else []
        return (f"MLA(b={self.b}, s={self.s}, d={self.d}, h={self.h}, e={self.e}, kv_rank={self.l}, "
                + ", ".join(opts) + ")")

    def _repr_pretty_(self, printer, cycle) -> None:
        mask = "" if self.mask is None else f", mask={self.mask!r}"
        printer.text(f"{self!r}, absorbed={self.absorbed}, causal={self.causal}{mask}, seed={self.seed}")


def numpy(params: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().cpu().numpy() for k, v in params.items()}


def canonical(module: CheckedModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.canonical_state().items()}


@draws_options(MLA, q_rank=lambda c: c.m, kv_norm=lambda c: c.kv_norm, q_norm=lambda c: c.q_norm,
               bias=lambda c: c.bias, rope=lambda c: c.r > 0, absorbed=lambda c: c.absorbed,
               causal=lambda c: c.causal, mask=lambda c: c.mask is not None)
@st.composite
def mla_cases(
    draw, offers: Offers, *, rope_offers: Offers | None = None, min_len: int = 1, max_len: int = 6, min_b: int = 1,
    min_h: int = 1, causal: bool | None = None, absorbed: bool | None = None, rope: bool | None = None,
    norms: bool | None = None, masks: bool = True,
) -> MLACase:
    """An MLA configuration the implementation offers.

    rope_offers: the implementation's RotaryEmbedding offers (its default base and pairing are used).
    causal, absorbed, rope, norms: a value the property needs (with ``needs``), or None to draw the offered
                 ones (norms: kv_norm and q_norm together).
    masks:       draw a mask where the implementation takes one (never one with an empty query row).
    """
    b = draw(st.integers(min_b, 2), label="b")
    s = draw(st.integers(min_len, max_len), label="s")
    h = draw(st.integers(min_h, 3), label="h")
    e = draw(st.integers(1, 3), label="e")
    d = draw(st.integers(1, 8), label="d")
    # kv_rank >= 2: an RMSNorm over one feature is sign(c) * weight, so ill-conditioned near c = 0 that
    # rounding luck, not the implementation, would decide the low-precision checks.
    l = draw(st.integers(2, 5), label="kv_rank")
    m = draw(offers.strategy("q_rank"), label="q_rank")
    with_rope = draw(offers.strategy("rope"), label="rope") if rope is None else rope
    r = 2 * draw(st.integers(1, 2), label="rope_dim/2") if with_rope else 0
    kv_norm = draw(offers.strategy("kv_norm"), label="kv_norm") if norms is None else norms
    q_norm = draw(offers.strategy("q_norm"), label="q_norm") if norms is None else norms
    bias = draw(offers.strategy("bias"), label="bias")
    is_absorbed = draw(offers.strategy("absorbed"), label="absorbed") if absorbed is None else absorbed
    is_causal = draw(offers.strategy("causal"), label="causal") if causal is None else causal
    mask = None
    if masks and offers.offers("mask", True):
        drawn = draw((st.none() if offers.offers("mask", False) else st.nothing())
                     | boolean_masks((b, 1, s, s)), label="mask")
        mask = None if drawn is None else no_empty_rows(drawn, causal=is_causal, s=s, t=s)
    rotary = (10000.0, "adjacent")
    if rope_offers is not None:
        rotary = (rope_offers.default("base"), rope_offers.default("pairing"))
    return MLACase(b=b, s=s, d=d, h=h, e=e, l=l, r=r, seed=draw(seeds(), label="seed"), m=m, kv_norm=kv_norm,
                   q_norm=q_norm, bias=bias, absorbed=is_absorbed, causal=is_causal, mask=mask, rope=rotary)


def cases(impl: Implementation, **kwargs) -> st.SearchStrategy[MLACase]:
    """mla_cases for ``impl``. The RoPE part is drawn only where the implementation provides
    RotaryEmbedding (MLA takes one as ``rotary``); ours is never substituted for it."""
    offers = impl.offers(MLA)
    if impl.provides("RotaryEmbedding"):
        return mla_cases(offers, rope_offers=impl.offers("RotaryEmbedding"), **kwargs)
    if kwargs.get("rope"):
        pytest.skip(f"needs rope=True, and {impl.missing_reason('RotaryEmbedding')}")
    return mla_cases(narrowed(offers, rope=False), **kwargs)


def new_cache(impl: Implementation, case: MLACase, *, capacity: int, dtype=torch.float64, device="cpu"):
    """Build the implementation's LatentKVCache, reporting a failing constructor plainly."""
    __tracebackhide__ = True
    config = dict(batch_size=case.b, kv_rank=case.l, rope_dim=case.r, capacity=capacity, dtype=dtype, device=device)
    try:
        return impl.raw("LatentKVCache")(**config)
    except Exception as exc:
        raise ComponentFailure(f"{impl}: {describe_call('LatentKVCache', config)} raised "
                               f"{type(exc).__name__}: {exc}") from None


def decode(case: MLACase, module, x: Tensor, cache, chunks: list[int], *, absorbed: bool | None = None) -> Tensor:
    """Run x chunk by chunk through the cache (causal); the concatenated outputs (b, s, d)."""
    __tracebackhide__ = True
    pieces = [case.call(module, x[:, a:b], causal=True, absorbed=absorbed, cache=cache)
              for a, b in split_points(x.shape[1], chunks)]
    return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------------------------------
# Agreement with the reference, and the two forms


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_mla_agrees_with_reference(impl, device, dtype, data):
    """The output equals the spec's float64 reference (the naive form) with the same weights, in both
    forms, masks included (float32 and half precision by the error-ratio rule against ours).

    Hint: the scale is 1/sqrt(head_dim + rope_dim); the rotated key comes from x, not from the latent,
    and is the same for every head; the latent norm sits between W_dkv and the up-projections.
    """
    case = data.draw(cases(impl), label="case")
    module = case.build(impl, device, dtype)
    params = canonical(module)
    x = case.inputs(device, dtype)
    out = case.call(module, x, mask=case.mask)
    baseline = None if dtype == torch.float64 else \
        case.call(case.build(OURS, device, dtype, params=params), x, mask=case.mask)
    assert_close(
        out, case.reference(params, x, mask=case.mask), baseline=baseline, axes=AXES,
        claim=f"{case} agrees with the spec's reference ({dtype}, absorbed={case.absorbed}, causal={case.causal}, "
        f"mask={case.mask!r})",
        hint="scale by 1/sqrt(head_dim + rope_dim); rotate the key part computed from x (one key for all "
        "heads) and each head's query part; normalise the latent before the up-projections.",
    )


@pytest.mark.needs(absorbed=True)
@given(data=st.data())
def test_mla_absorbed_form_equals_the_naive_form(impl, data):
    """The absorbed inference form (W_uk folded into the queries, W_uv into the output, attention over the
    latents) gives the naive form's outputs: for the whole sequence, and chunk by chunk through a latent
    cache (any split), where the cache is offered.

    Hint: per head, <q, W_uk c> = <W_uk^T q, c> with W_uk reshaped (h, e, l) (rows of head i are
    i*e .. (i+1)*e - 1: rearrange '(h e) l -> h e l', not a bare view as (h, l, e)); keep the rotated part
    in the scores and the 1/sqrt(head_dim + rope_dim) scale; RoPE must not touch the latent.
    """
    offers = impl.offers(MLA)
    cached = impl.provides("LatentKVCache") and offers.offers("cache", True) and offers.offers("causal", True) \
        and data.draw(st.booleans(), label="cached")
    case = data.draw(cases(impl, absorbed=False, masks=not cached, **({"causal": True} if cached else {})),
                     label="case")
    module = case.build(impl)
    x = case.inputs()
    naive = case.call(module, x, mask=case.mask, absorbed=False)
    if cached:
        chunks = data.draw(chunkings(case.s), label="chunks")
        absorbed = decode(case, module, x, new_cache(impl, case, capacity=case.s), chunks, absorbed=True)
        how = f"chunk by chunk {chunks} through a latent cache"
    else:
        absorbed, how = case.call(module, x, mask=case.mask, absorbed=True), "in one pass"
    assert_close(
        absorbed, naive, axes=AXES,
        claim=f"{case}: the absorbed form ({how}) equals the naive form (causal={case.causal}, mask={case.mask!r})",
        hint="fold W_uk per head into the query (einsum 'b h s e, h e l -> b h s l' with W_uk as '(h e) l -> h e l') "
        "and W_uv into the output; attend over [latent ; rotated key] with the latent as values.",
    )


# ---------------------------------------------------------------------------------------------------
# The latent cache


@pytest.mark.needs(cache=True, causal=True)
@pytest.mark.requires("LatentKVCache")
@given(data=st.data())
def test_cached_mla_equals_the_full_pass(impl, device, data):
    """For any split into a prefill and later chunks (one token at a time included), causal MLA with a
    latent cache gives the outputs of one full causal pass, in either form.

    Hint: a chunk starts at position cache.length: rotate its query and key parts there (offset), append
    the latents after the cached ones, and align the causal mask bottom-right (query j at length + j).
    """
    case = data.draw(cases(impl, max_len=6, causal=True, masks=False), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    module = case.build(impl, device)
    x = case.inputs(device)
    cached = decode(case, module, x, new_cache(impl, case, capacity=case.s, device=device), chunks)
    assert_close(
        cached, case.call(module, x), axes=AXES,
        claim=f"cached {case} equals the full causal pass (chunks {chunks}, absorbed={case.absorbed})",
        hint="rotate at offset = cache.length, append on the position axis, bottom-right causal alignment.",
    )


def held_numbers(cache) -> int:
    """Floating-point numbers held in the cache object's tensors (attributes, and lists, tuples and
    dicts of tensors among them)."""
    total = 0
    for value in vars(cache).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        total += sum(t.numel() for t in items if isinstance(t, Tensor) and t.is_floating_point())
    return total


@pytest.mark.needs(cache=True, causal=True)
@pytest.mark.requires("LatentKVCache")
@given(data=st.data())
def test_mla_cache_holds_only_the_latent_and_the_rotated_shared_key(impl, data):
    """After decoding a sequence, the cache holds (b, capacity, kv_rank) latents and (b, capacity,
    rope_dim) rotated keys and nothing else: kv_rank + rope_dim numbers per token and layer (DeepSeek-V2,
    Table 1; MHA would hold 2 * n_head * head_dim). They are the normalised latents RMSNorm(x W_dkv^T) and
    the shared keys RoPE(x W_kr^T) rotated at their true positions.

    Hint: cache c_KV after its norm and k^R after RoPE, never the up-projected per-head keys and values.
    """
    case = data.draw(cases(impl, causal=True, masks=False), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    module = case.build(impl)
    x = case.inputs()
    cache = new_cache(impl, case, capacity=case.s)
    decode(case, module, x, cache, chunks)
    want = spec.latent_cache_storage_shapes(batch_size=case.b, kv_rank=case.l, rope_dim=case.r, capacity=case.s)
    shape = lambda name: tuple(getattr(getattr(cache, name, None), "shape", ()))  # noqa: E731 (() when missing)
    per_token = spec.mla_cache_numbers_per_token(kv_rank=case.l, rope_dim=case.r)
    claim = (f"{case}: after decoding chunks {chunks}, the cache holds latents {want[0]} and rotated keys {want[1]} "
             f"only ({per_token} numbers per token, against {2 * case.h * case.e} for MHA)")
    hint = "cache the latent and the one rotated key per token; up-project keys and values when attending."
    got = (shape("latents"), shape("rope_keys"))
    assert_true(got == want, claim=claim, detail=f"latents {got[0]}, rope_keys {got[1]}", hint=hint)
    held = held_numbers(cache)
    assert_true(held == case.b * case.s * per_token, claim=claim,
                detail=f"it holds {held} numbers for {case.b} x {case.s} tokens: {held / (case.b * case.s):g} per "
                f"token", hint=hint)
    params = numpy(canonical(module))
    assert_close(cache.latents[:, : case.s], spec.latent(params, x.numpy()), axes="b t l", claim=claim,
                 hint="the cache keeps c_KV after its RMSNorm (kv_norm), before the up-projections.")
    if case.r:
        assert_close(cache.rope_keys[:, : case.s], spec.rotated_key(params, x.numpy(), rotary=case.rotary()),
                     axes="b t r", claim=claim,
                     hint="the cache keeps k^R = RoPE(x W_kr^T) rotated at its true position (cache.length + j).")


# ---------------------------------------------------------------------------------------------------
# Structure: low-rank MHA, heads sharing the latent and the rotated key


@pytest.mark.needs(kv_norm=False, q_norm=False)
@given(data=st.data())
def test_mla_without_norms_and_rotated_query_is_low_rank_mha(impl, data):
    """Without the latent norms and with the rotated query part zero (or no RoPE part), MLA is exactly
    multi-head attention whose weights are the products W_q = W_uq W_dq, W_k = W_uk W_dkv, W_v = W_uv W_dkv
    (biases carried through), scaled by 1/sqrt(head_dim + rope_dim): a low-rank MHA.

    Hint: keys and values are up-projections of one latent; the rope width still counts in the scale.
    """
    case = data.draw(cases(impl, norms=False), label="case")
    params = canonical(case.build(impl))
    for name in ("q_rope.weight", "q_rope.bias"):
        if name in params:
            params[name] = torch.zeros_like(params[name])
    module = case.build(impl, params=params)
    x = case.inputs()
    mha = spec.low_rank_mha_parameters(numpy(params), n_head=case.h, head_dim=case.e, rope_dim=case.r)
    want = reference_attention(mha, x.numpy(), n_head=case.h, mask=case.mask, causal=case.causal)
    assert_close(
        case.call(module, x, mask=case.mask), want, axes=AXES,
        claim=f"{case} without norms and rotated query equals MHA with the product weights (absorbed={case.absorbed}, "
        f"causal={case.causal}, mask={case.mask!r})",
        hint="k = W_uk (W_dkv x), v = W_uv (W_dkv x); scale 1/sqrt(head_dim + rope_dim) even when the rotated "
        "part contributes nothing.",
    )


@given(data=st.data())
def test_mla_heads_share_the_latent_and_the_rotated_key(impl, data):
    """Each head is a one-head MLA with its own rows of the per-head projections (q or q_up, q_rope,
    k_up, v_up) and columns of o, and the same latent and the same rotated key: the output is the sum of
    the h one-head outputs (minus h - 1 output biases).

    Hint: one rotated key k^R = RoPE(x W_kr^T) serves every head (expand it over the head axis after
    rotating, in (b, h, s, r) layout); head i's query rows are i*e .. (i+1)*e - 1 (and i*r .. (i+1)*r - 1).
    """
    case = data.draw(cases(impl, min_h=2), label="case")
    module = case.build(impl)
    params = canonical(module)
    x = case.inputs()
    out = case.call(module, x, mask=case.mask)
    total = torch.zeros_like(out)
    for i in range(case.h):
        one = spec.one_head_parameters(params, i, n_head=case.h, head_dim=case.e, rope_dim=case.r)
        total = total + case.call(case.build(impl, params=one, n_head=1), x, mask=case.mask)
    if "o.bias" in params:
        total = total - (case.h - 1) * params["o.bias"]
    assert_close(
        out, total, axes=AXES,
        claim=f"{case} is the sum of its {case.h} heads, each a one-head MLA with the same latent and rotated key "
        f"(absorbed={case.absorbed}, causal={case.causal}, mask={case.mask!r})",
        hint="the rotated key is one per token, shared by the heads; split per-head rows as '(h e)'.",
    )


# ---------------------------------------------------------------------------------------------------
# Attention-module claims


@pytest.mark.needs(causal=True)
@given(data=st.data())
def test_causal_mla_never_leaks_the_future(impl, device, data):
    """With causal=True, changing the inputs after position p changes no output at or before p."""
    case = data.draw(cases(impl, causal=True, masks=False), label="case")
    cut = data.draw(st.integers(0, case.s - 1), label="last_unchanged_position")
    module = case.build(impl, device)
    x = case.inputs(device)
    x2 = x.clone()
    x2[:, cut + 1 :] += tensor(case.seed + 7, *x2[:, cut + 1 :].shape, dtype=x.dtype, device=device)
    assert_equal(
        case.call(module, x2)[:, : cut + 1], case.call(module, x)[:, : cut + 1], axes=AXES,
        claim=f"causal {case} (absorbed={case.absorbed}) ignores inputs after position {cut} at positions up to {cut}",
        hint="the causal mask must keep keys j <= i for query i, in the absorbed form too.",
    )


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_mla_masked_keys_have_no_influence(impl, device, data):
    """Padding: changing the inputs at masked key positions changes no output at the real positions."""
    case = data.draw(cases(impl, masks=False), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")  # (b, s), real tokens first
    module = case.build(impl, device)
    x = case.inputs(device)
    hidden = torch.from_numpy(~keep).to(device)[..., None]
    mask = keep[:, None, None, :].view(Mask)
    x2 = torch.where(hidden, x + 1.5, x)
    assert_equal(
        case.call(module, x2, mask=mask) * ~hidden, case.call(module, x, mask=mask) * ~hidden, axes=AXES,
        claim=f"{case}: masked (padding) keys have no influence on real positions (absorbed={case.absorbed}, "
        f"causal={case.causal}, keep={keep.astype(int).tolist()})",
        hint="mask the scores of both forms (True = may attend) before the softmax.",
    )


@given(data=st.data())
def test_mla_batch_elements_are_independent(impl, device, data):
    """Changing batch element 0 changes no output of the other batch elements."""
    case = data.draw(cases(impl, min_b=2), label="case")
    module = case.build(impl, device)
    x = case.inputs(device)
    x2 = x.clone()
    x2[0] += 1.0
    assert_equal(
        case.call(module, x2, mask=case.mask)[1:], case.call(module, x, mask=case.mask)[1:], axes=AXES,
        claim=f"{case}: batch elements are independent (absorbed={case.absorbed}, causal={case.causal})",
        hint="expand the shared rotated key over heads, not over the batch; keep the batch axis apart.",
    )


@pytest.mark.needs(rope=True, mask=True)
@given(data=st.data())
def test_mla_depends_only_on_relative_positions(impl, data):
    """Moving a sequence p positions later (behind p tokens it may not attend to) leaves its outputs
    unchanged: the rotated query and key parts meet only through their distance, and nothing else sees
    a position.

    Hint: rotate the query part and the key part by the same convention at the same positions; never
    rotate the latent (it also feeds the values) or the content parts.
    """
    case = data.draw(cases(impl, rope=True, masks=False), label="case")
    p = data.draw(st.integers(1, 3), label="shift")
    module = case.build(impl)
    x = case.inputs()
    shifted = torch.cat([case.inputs(s=p, seed=5), x], dim=1)  # (b, p + s, d)
    n = p + case.s
    # The sequence's queries see its own keys only; each of the p tokens in front sees itself (no empty rows).
    allowed = (np.arange(n)[None, :] >= p) | ((np.arange(n)[:, None] < p) & np.eye(n, dtype=bool))
    mask = np.broadcast_to(allowed, (case.b, 1, n, n)).copy().view(Mask)
    assert_close(
        case.call(module, shifted, mask=mask)[:, p:], case.call(module, x), axes=AXES,
        claim=f"{case}: moving the sequence {p} positions later (behind masked tokens) changes no output "
        f"(absorbed={case.absorbed}, causal={case.causal})",
        hint="rotate both q^R and k^R at their positions (RoPE makes their score depend on the distance only).",
    )


@given(data=st.data())
def test_every_mla_parameter_gets_a_finite_gradient(impl, device, data):
    """Backpropagating a loss reaches every parameter with a finite gradient, nonzero for every matrix,
    in either form (the absorbed form may leave out the key bias, which softmax cancels)."""
    case = data.draw(cases(impl, min_len=2, masks=False), label="case")
    module = case.build(impl, device)
    x = case.inputs(device)
    out = case.call(module, x)
    backward((out * tensor(case.seed + 9, *out.shape, dtype=out.dtype, device=device)).sum(), module)
    # Read through the module's own parameters (a fused layout's canonical tensors may be copies). The
    # absorbed form may leave out the key bias: it adds <q_i, b_uk,i> to every score of a row, which
    # softmax cancels (its exact gradient is zero in either form).
    key_bias = module.canonical_state().get("k_up.bias") if case.absorbed else None
    own = {name: p for name, p in module.module.named_parameters() if p is not key_bias}
    assert_parameters_get_finite_gradients(
        own,
        claim=f"{case}: every parameter receives a finite gradient, nonzero for matrices (absorbed={case.absorbed})",
        hint="a parameter without gradient is unused or cut off by .detach() / torch.no_grad().",
    )
