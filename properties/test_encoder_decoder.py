"""Properties of the encoder-decoder model (the original transformer). Spec: spec/encoder_decoder.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.probes import assert_parameters_get_finite_gradients
from properties.attention_cases import OURS
from properties.options import Offers, draws_options
from properties.plugin import COMPONENTS, CheckedModule, Implementation, backward
from properties.strategies import as_mask, chunkings, optional_padding, padding_masks, seeds
from spec.encoder_decoder import encoder_decoder_model
from spec.kv_cache import split_points

pytestmark = pytest.mark.requires("EncoderDecoderModel")
MODEL = "EncoderDecoderModel"
AXES = "b s n"


@dataclass(frozen=True)
class EncoderDecoderCase:
    """Sizes (b batch, t source positions, s target positions, n_src / n source and target vocabularies,
    h heads, e head width, f feed-forward width), the seed of weights and tokens, and the options
    (activation and eps are conventions: the implementation's own, never passed)."""

    b: int
    t: int
    s: int
    n_src: int
    n: int
    h: int
    e: int
    layers: int
    f: int
    seed: int
    norm_first: bool = False
    dropout: float = 0.0
    activation: str = "relu"
    eps: float = 1e-5

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def max_len(self) -> int:
        return max(self.s, self.t) + 1

    def config(self) -> dict:
        return dict(src_vocab_size=self.n_src, tgt_vocab_size=self.n, d_model=self.d, n_head=self.h,
                    n_layer=self.layers, d_ff=self.f, max_len=self.max_len, norm_first=self.norm_first,
                    dropout=self.dropout)

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64) -> CheckedModule:
        return impl.build(MODEL, seed=self.seed, device=device, dtype=dtype, **self.config())

    def build_ours_alike(self, device="cpu", dtype=torch.float64) -> CheckedModule:
        """Ours in the same configuration, conventions included (a declared gelu or eps): the baseline."""
        return OURS.build(MODEL, seed=self.seed, device=device, dtype=dtype, **self.config(),
                          activation=self.activation, eps=self.eps)

    def _tokens(self, salt: int, high: int, shape: tuple[int, int], device) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1 + salt)
        return torch.randint(0, high, shape, generator=gen).to(device)

    def src(self, salt: int = 0, device="cpu") -> Tensor:
        return self._tokens(salt, self.n_src, (self.b, self.t), device)

    def tgt(self, salt: int = 0, device="cpu") -> Tensor:
        return self._tokens(salt + 1000, self.n, (self.b, self.s), device)

    def __repr__(self) -> str:
        options = f", norm_first={self.norm_first}"
        options += f", activation={self.activation}" if self.activation != "relu" else ""
        options += f", eps={self.eps:g}" if self.eps != 1e-5 else ""
        return (f"EncoderDecoderModel case(b={self.b}, t={self.t}, s={self.s}, n_src={self.n_src}, n={self.n}, "
                f"h={self.h}, e={self.e}, d={self.d}, n_layer={self.layers}, f={self.f}{options}, seed={self.seed})")


@draws_options(MODEL, norm_first=lambda case: case.norm_first)
@st.composite
def encoder_decoder_cases(draw, offers: Offers, *, min_t: int = 1, min_s: int = 1, min_b: int = 1, min_f: int = 1):
    """Tiny models of the options ``offers`` offers: vocabularies <= 11, d_model in 4 .. 8 and even
    (sin/cos pairs), at most 2 layers, source and target lengths <= 6; norm_first drawn, dropout,
    activation and eps the implementation's defaults."""
    h = draw(st.integers(1, 2), label="h")
    return EncoderDecoderCase(
        b=draw(st.integers(min_b, 2), label="b"), t=draw(st.integers(min_t, 6), label="t"),
        s=draw(st.integers(min_s, 6), label="s"), n_src=draw(st.integers(3, 11), label="n_src"),
        n=draw(st.integers(3, 11), label="n"), h=h, e=2 * draw(st.integers(2 // h, 4 // h), label="e/2"),
        layers=draw(st.integers(1, 2), label="n_layer"), f=draw(st.integers(min_f, max(min_f, 8)), label="f"),
        seed=draw(seeds(), label="seed"), norm_first=draw(offers.strategy("norm_first"), label="norm_first"),
        dropout=offers.default("dropout"), activation=offers.default("activation"), eps=offers.default("eps"),
    )


# The shared strategy properties/strategies.optional_padding draws this family's padding-mask options;
# registered here so that the option meta test checks it per component.
draws_options(MODEL, kwargs={"b": 2, "n": 3, "option": "src_mask"}, src_mask=lambda keep: keep is not None)(optional_padding)
draws_options(MODEL, kwargs={"b": 2, "n": 3, "option": "tgt_mask"},
              tgt_mask=lambda keep: keep is not None)(optional_padding)


def cases(impl: Implementation, **kwargs) -> st.SearchStrategy[EncoderDecoderCase]:
    return encoder_decoder_cases(impl.offers(MODEL), **kwargs)


def masks(device="cpu", **keeps) -> dict[str, Tensor]:
    """The mask keywords to pass: only those given (a model without src_mask is never passed one)."""
    return {name: as_mask(keep, device) for name, keep in keeps.items() if keep is not None}


def logits_of(model: CheckedModule, src: Tensor, tgt: Tensor, *, src_mask=None, tgt_mask=None) -> Tensor:
    """model(src, tgt) with the spec's shape (b, s, n) checked."""
    __tracebackhide__ = True
    out = model(src, tgt, **masks(src.device, src_mask=src_mask, tgt_mask=tgt_mask))
    want = (*tgt.shape, model.config["tgt_vocab_size"])
    assert_true(tuple(out.shape) == want, claim=f"{model} returns logits (b, s, n) = {want}",
                detail=f"shape {tuple(out.shape)}", hint="decode returns head(y): one row of logits per target position.")
    return out


def changed(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Boolean: does any entry differ at all (bit-for-bit) along the reduced dims."""
    return (a != b).any(dim=dims) if dims else a != b


def next_token_loss(impl: Implementation):
    """The implementation's shifted cross-entropy (spec/tasks.py) where it provides one; else torch's."""
    if "next_token_loss" in COMPONENTS and impl.provides("next_token_loss"):
        return impl.function("next_token_loss")

    def shifted(logits, tokens, *, mask=None):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return shifted


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_encoder_decoder_model_agrees_with_reference(impl, device, dtype, data):
    """Teacher-forced logits equal the spec's float64 reference with the same weights, post- and pre-norm,
    padding included where the model takes masks (float32 by the error-ratio rule against ours in the
    same configuration).

    Hint: embeddings times sqrt(d_model) plus the sinusoidal table, src_mask as the key mask of the encoder
    AND of every cross-attention, a causal decoder, final norms when norm_first, and a head without bias.
    """
    offers = impl.offers(MODEL)
    case = data.draw(cases(impl), label="case")
    src_keep = data.draw(optional_padding(offers, case.b, case.t, "src_mask"), label="src_keep")
    tgt_keep = data.draw(optional_padding(offers, case.b, case.s, "tgt_mask"), label="tgt_keep")
    model = case.build(impl, device, dtype)
    src, tgt = case.src(device=device), case.tgt(device=device)
    out = logits_of(model, src, tgt, src_mask=src_keep, tgt_mask=tgt_keep)
    baseline = logits_of(case.build_ours_alike(device, dtype), src, tgt, src_mask=src_keep, tgt_mask=tgt_keep)
    params = model.canonical_numpy()
    want = encoder_decoder_model(params, src.cpu().numpy(), tgt.cpu().numpy(), n_head=case.h, n_layer=case.layers,
                                 max_len=case.max_len, norm_first=case.norm_first, src_mask=src_keep,
                                 tgt_mask=tgt_keep, activation=case.activation, eps=case.eps)
    assert_close(out, want, baseline=baseline, axes=AXES,
                 claim=f"{case} agrees with the spec's reference ({dtype}, src_keep={src_keep!r}, tgt_keep={tgt_keep!r})",
                 hint="scale embeddings by sqrt(d_model) before adding positions; src_mask hides padding from the "
                 "encoder and from cross-attention; encoder_norm/decoder_norm only when norm_first.")


@given(data=st.data())
def test_encoder_decoder_is_causal_end_to_end(impl, device, data):
    """The logits at target position j do not depend on target tokens after j: changing them leaves the
    logits at 0 .. j bit-for-bit unchanged."""
    case = data.draw(cases(impl, min_s=2), label="case")
    cut = data.draw(st.integers(0, case.s - 2), label="last_unchanged_position")
    model = case.build(impl, device)
    src, tgt = case.src(device=device), case.tgt(device=device)
    other = tgt.clone()
    other[:, cut + 1 :] = (tgt[:, cut + 1 :] + 1) % case.n
    assert_equal(logits_of(model, src, other)[:, : cut + 1], logits_of(model, src, tgt)[:, : cut + 1], axes=AXES,
                 claim=f"{case}: logits up to position {cut} ignore target tokens after it",
                 hint="the decoder's self-attention must be causal (teacher forcing feeds the whole target).")


@given(data=st.data())
def test_encoder_decoder_memory_sees_every_source_position(impl, data):
    """The encoder is bidirectional: changing the source token at any position changes the memory at every
    position, before it and after it."""
    case = data.draw(cases(impl, min_t=2), label="case")
    model = case.build(impl)
    src = case.src()
    memory = model.method("encode", src)
    unseen = []
    for j in range(case.t):
        other = src.clone()
        other[:, j] = (src[:, j] + 1) % case.n_src
        reached = changed(model.method("encode", other), memory, dims=(2,))  # (b, t)
        unseen += [(j, i) for i in range(case.t) if not bool(reached[:, i].all())]
    assert_true(not unseen, claim=f"{case}: the memory at every position depends on every source token",
                detail=f"(changed source position, unchanged memory position): {unseen}",
                hint="the encoder attends in both directions: no causal mask, only the source padding mask.")


@pytest.mark.needs(src_mask=True)
@given(data=st.data())
def test_encoder_decoder_ignores_padded_source_positions(impl, device, data):
    """Changing the source tokens at padded positions (src_mask False) leaves the logits bit-for-bit unchanged."""
    case = data.draw(cases(impl, min_t=2), label="case")
    keep = data.draw(padding_masks(case.b, case.t), label="src_keep")
    model = case.build(impl, device)
    src, tgt = case.src(device=device), case.tgt(device=device)
    other = torch.where(as_mask(keep, device), src, (src + 1) % case.n_src)
    assert_equal(logits_of(model, other, tgt, src_mask=keep), logits_of(model, src, tgt, src_mask=keep), axes=AXES,
                 claim=f"{case}: padded source positions have no influence (src_keep={keep!r})",
                 hint="pass src_mask to the encoder's self-attention and, as memory_mask, to every cross-attention.")


@given(data=st.data())
def test_encoder_decoder_depends_on_every_real_source_position(impl, data):
    """Changing the source token at any real position changes the logits at every target position."""
    case = data.draw(cases(impl), label="case")
    keep = data.draw(optional_padding(impl.offers(MODEL), case.b, case.t, "src_mask"), label="src_keep")
    model = case.build(impl)
    src, tgt = case.src(), case.tgt()
    base = logits_of(model, src, tgt, src_mask=keep)
    real = np.ones((case.b, case.t), dtype=bool) if keep is None else np.asarray(keep)
    unseen = []
    for j in range(case.t):
        other = src.clone()
        other[:, j] = (src[:, j] + 1) % case.n_src
        reached = changed(logits_of(model, other, tgt, src_mask=keep), base, dims=(2,))  # (b, s)
        unseen += [(i, j) for i in range(case.b) if real[i, j] and not bool(reached[i].all())]
    assert_true(not unseen, claim=f"{case}: every target position depends on every real source position (keep={keep!r})",
                detail=f"(batch element, source position) with no influence on some target position: {unseen}",
                hint="cross-attention reads the encoder's memory (keys and values), True = real in the mask.")


@pytest.mark.needs(cache=True)
@given(data=st.data())
def test_encoder_decoder_cached_decoding_equals_teacher_forcing(impl, data):
    """Decoding the target chunk by chunk with the cache (one KVCache per decoder layer) gives the logits of
    one teacher-forced pass, for any chunking (one token at a time included).

    Hint: a chunk's first token sits at position cache[0].length: add those sinusoidal rows (offset), and
    hand cache[i] to decoder layer i, whose causal mask aligns bottom-right.
    """
    case = data.draw(cases(impl), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    keep = data.draw(optional_padding(impl.offers(MODEL), case.b, case.t, "src_mask"), label="src_keep")
    model = case.build(impl)
    src, tgt = case.src(), case.tgt()
    src_mask = masks(src_mask=keep)
    memory = model.method("encode", src, **src_mask)
    full = model.method("decode", tgt, memory, **src_mask)
    cache = model.method("new_cache", batch_size=case.b, capacity=case.s)
    pieces = [model.method("decode", tgt[:, a:b], memory, cache=cache, **src_mask)
              for a, b in split_points(case.s, chunks)]
    assert_close(torch.cat(pieces, dim=1), full, axes=AXES,
                 claim=f"{case}: cached decoding in chunks {chunks} equals teacher forcing (src_keep={keep!r})",
                 hint="offset the positions by the cache length and pass each layer its own cache.")


@pytest.mark.needs(cache=True)
@given(data=st.data())
def test_encoder_decoder_greedy_generation_with_cache_equals_without(impl, data):
    """Greedy generation gives the same tokens with the cache as without it."""
    case = data.draw(cases(impl), label="case")
    steps = data.draw(st.integers(1, case.max_len - 1), label="max_new_tokens")
    bos = data.draw(st.integers(0, case.n - 1), label="bos_id")
    keep = data.draw(optional_padding(impl.offers(MODEL), case.b, case.t, "src_mask"), label="src_keep")
    model = case.build(impl)
    src, src_mask = case.src(), masks(src_mask=keep)
    cached = model.method("generate", src, bos_id=bos, max_new_tokens=steps, use_cache=True, **src_mask)
    plain = model.method("generate", src, bos_id=bos, max_new_tokens=steps, use_cache=False, **src_mask)
    assert_equal(cached, plain, axes="b s",
                 claim=f"{case}: greedy generation of {steps} tokens is the same with and without the cache",
                 hint="with the cache feed only the newest token, at position cache[0].length.")


@pytest.mark.parametrize("use_cache", [pytest.param(True, marks=pytest.mark.needs(cache=True)), False])
@given(data=st.data())
def test_encoder_decoder_greedy_generation_is_the_argmax_of_teacher_forcing(impl, use_cache, data):
    """generate returns (b, 1 + max_new_tokens): bos_id, then at every step the argmax of the teacher-forced
    logits of the last position of the sequence so far (with the cache and without it; a model without a
    cache is called without use_cache)."""
    case = data.draw(cases(impl), label="case")
    steps = data.draw(st.integers(1, case.max_len - 1), label="max_new_tokens")
    bos = data.draw(st.integers(0, case.n - 1), label="bos_id")
    model = case.build(impl)
    src = case.src()
    cache = {"use_cache": use_cache} if impl.offers(MODEL).offers("cache") else {}
    out = model.method("generate", src, bos_id=bos, max_new_tokens=steps, **cache)
    claim = f"{case}: generate(bos_id={bos}, max_new_tokens={steps}, {cache}) is greedy"
    assert_true(isinstance(out, Tensor) and tuple(out.shape) == (case.b, 1 + steps), claim=claim,
                detail=f"returned {getattr(out, 'shape', type(out).__name__)}",
                hint="return bos_id followed by exactly max_new_tokens tokens.")
    assert_true(bool((out[:, 0] == bos).all()), claim=claim, detail=f"the first column is {out[:, 0].tolist()}",
                hint="the sequence starts with bos_id.")
    with torch.no_grad():
        best = logits_of(model, src, out[:, :-1]).argmax(dim=-1)  # (b, steps): the token each prefix predicts
    assert_equal(out[:, 1:], best, axes="b s", claim=claim,
                 hint="take the argmax of the LAST position's logits at each step and append it.")


@given(data=st.data())
def test_every_encoder_decoder_parameter_gets_a_finite_gradient(impl, data):
    """The teacher-forced shifted cross-entropy (next_token_loss of the logits and the target) reaches every
    parameter with a finite gradient, nonzero for every matrix.

    Hint: a parameter without gradient is built but never used (a final norm not applied, cross-attention
    skipped) or cut off by .detach(); the key biases' gradients are exactly zero (softmax cancels them).
    d_ff >= 16: with few relu units every one can be dead at every position (the thorough profile found
    f = 5), which zeroes the feed-forward gradients of a correct model.
    """
    case = data.draw(cases(impl, min_t=2, min_s=3, min_b=2, min_f=16), label="case")
    model = case.build(impl)
    tgt = case.tgt()
    backward(next_token_loss(impl)(logits_of(model, case.src(), tgt), tgt), model)
    assert_parameters_get_finite_gradients(
        dict(model.module.named_parameters()),
        claim=f"{case}: the shifted cross-entropy reaches every parameter",
        hint="every parameter must be on the path from the tokens to the logits.")
