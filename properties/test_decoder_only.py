"""Properties of the decoder-only language model: reference, causality, the KV cache at model level,
generation, padding, weight tying, gradients. Spec: spec/decoder_only.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from properties.assertions import assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import CheckedModule, ComponentFailure, Implementation, backward
from properties.probes import gradcheck
from properties.strategies import chunkings, optional_padding, padding_masks, seeds
from spec.decoder_only import decoder_only_lm, greedy_continuation
from spec.kv_cache import cache_storage_shape, split_points

pytestmark = pytest.mark.requires("DecoderOnlyLM")
LM = "DecoderOnlyLM"
AXES = "b s n"


@dataclass(frozen=True)
class LMConfig:
    """Sizes of one model and its input, by the shape glossary: b batch, s positions, n vocabulary,
    h query heads, g key/value heads (None: n_kv_head is not passed, MHA), e head width, f feed-forward
    width; and the options, drawn or the implementation's defaults (eps and pairing are conventions: the
    implementation's, never passed)."""

    b: int
    s: int
    n: int
    h: int
    g: int | None
    e: int
    f: int
    n_layer: int
    max_len: int
    positions: str
    norm: str
    activation: str
    tie: bool
    seed: int
    bias: bool = True
    dropout: float = 0.0
    eps: float = 1e-5
    pairing: str = "adjacent"

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def ctor(self) -> dict:
        kw = dict(vocab_size=self.n, d_model=self.d, n_head=self.h, n_layer=self.n_layer, d_ff=self.f,
                  max_len=self.max_len, positions=self.positions, norm=self.norm, activation=self.activation,
                  tie_weights=self.tie, bias=self.bias, dropout=self.dropout)
        return kw if self.g is None else kw | {"n_kv_head": self.g}

    @property
    def kv_heads(self) -> int:
        return self.h if self.g is None else self.g

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64) -> CheckedModule:
        return impl.build(LM, seed=self.seed, device=device, dtype=dtype, **self.ctor)

    def tokens(self, device="cpu", *, seed_shift: int = 1, s: int | None = None) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + seed_shift)
        return torch.randint(self.n, (self.b, self.s if s is None else s), generator=gen).to(device)

    def __repr__(self) -> str:
        heads = "MHA" if self.g is None else ("MQA" if self.g == 1 else f"GQA g={self.g}")
        extra = "" if self.bias else ", bias=False"
        extra += f", eps={self.eps:g}" if self.eps != 1e-5 else ""
        extra += f", pairing={self.pairing}" if self.positions == "rope" and self.pairing != "adjacent" else ""
        return (f"DecoderOnlyLM(b={self.b}, s={self.s}, n={self.n}, h={self.h}, {heads}, e={self.e}, d={self.d}, "
                f"f={self.f}, n_layer={self.n_layer}, max_len={self.max_len}, positions={self.positions}, "
                f"norm={self.norm}, activation={self.activation}, tie={self.tie}{extra})")


@draws_options(LM, positions=lambda c: c.positions, norm=lambda c: c.norm, activation=lambda c: c.activation,
               tie_weights=lambda c: c.tie, bias=lambda c: c.bias, n_kv_head=lambda c: c.g is not None)
@st.composite
def lm_configs(draw, offers: Offers, *, heads: str | None = None, positions: str | None = None,
               tie: bool | None = None, min_s: int = 1, max_s: int = 6, extra_len: int = 0, min_b: int = 1,
               max_n: int = 11) -> LMConfig:
    """A small model (d <= 8, n_layer <= 2, vocabulary <= 11) of the options ``offers`` offers, and input sizes.

    heads: "mha" (n_kv_head not passed), "mqa" (1), "gqa" (a proper divisor: h=4, g=2), or None: MHA, or
           MQA / GQA where the model takes n_kv_head. positions, tie: a value the property needs, or None.
    Head widths are even so that RoPE applies. max_len >= s + extra_len (room for generated tokens).
    """
    if heads is None:
        grouped = draw(offers.strategy("n_kv_head"), label="grouped_kv")
        heads = draw(st.sampled_from(["mqa", "gqa"]), label="heads") if grouped else "mha"
    if heads == "mha":
        h, g = draw(st.sampled_from([1, 2, 4]), label="h"), None
    elif heads == "mqa":
        h, g = draw(st.sampled_from([2, 4]), label="h"), 1
    else:
        h, g = 4, 2
    e = draw(st.sampled_from([2, 4] if h <= 2 else [2]), label="e")
    b = draw(st.integers(min_b, 2), label="b")
    s = draw(st.integers(min_s, max_s), label="s")
    return LMConfig(
        b=b, s=s, n=draw(st.integers(2, max_n), label="n"), h=h, g=g, e=e, f=draw(st.integers(1, 8), label="f"),
        n_layer=draw(st.integers(1, 2), label="n_layer"),
        max_len=s + extra_len + draw(st.integers(0, 2), label="spare_len"),
        positions=positions or draw(offers.strategy("positions"), label="positions"),
        norm=draw(offers.strategy("norm"), label="norm"),
        activation=draw(offers.strategy("activation"), label="activation"),
        tie=draw(offers.strategy("tie_weights"), label="tie") if tie is None else tie,
        seed=draw(seeds(), label="seed"),
        bias=draw(offers.strategy("bias"), label="bias"),
        dropout=offers.default("dropout"), eps=offers.default("eps"), pairing=offers.default("pairing"),
    )


# The shared strategy properties/strategies.optional_padding draws this family's padding-mask options;
# registered here so that the option meta test checks it per component.
draws_options(LM, kwargs={"b": 2, "n": 3}, mask=lambda keep: keep is not None)(optional_padding)


def configs(impl: Implementation, **kwargs) -> st.SearchStrategy[LMConfig]:
    return lm_configs(impl.offers(LM), **kwargs)


def cache_choices(impl: Implementation) -> list[dict]:
    """The generate keywords to try: use_cache=True and False where the model has a cache, none otherwise
    (a model without a cache generates by running the whole sequence every step)."""
    return [{"use_cache": True}, {"use_cache": False}] if impl.offers(LM).offers("cache") else [{}]


def reference(model: CheckedModule, cfg: LMConfig, tokens: Tensor, mask: Tensor | None = None) -> np.ndarray:
    params = model.canonical_numpy()
    return decoder_only_lm(params, tokens.cpu().numpy(), n_head=cfg.h, n_layer=cfg.n_layer, max_len=cfg.max_len,
                           n_kv_head=cfg.g, positions=cfg.positions, norm=cfg.norm, activation=cfg.activation,
                           tie_weights=cfg.tie, mask=None if mask is None else mask.cpu().numpy(), eps=cfg.eps,
                           pairing=cfg.pairing)


def logits_of(model: CheckedModule, cfg: LMConfig, tokens: Tensor, **kwargs) -> Tensor:
    """model(tokens, ...) with the spec's output shape (b, s, n) checked."""
    __tracebackhide__ = True
    out = model(tokens, **kwargs)
    want = (*tokens.shape, cfg.n)
    if tuple(out.shape) != want:
        raise ComponentFailure(f"{model}: returned logits of shape {tuple(out.shape)}, the spec says (b, s, n) = {want}")
    return out


def greedy_reference(model: CheckedModule, prompt: Tensor, max_new_tokens: int) -> Tensor:
    """The spec's greedy loop (spec.decoder_only.greedy_continuation) over the model's own full forward pass."""
    def last_logits(seq: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(seq, device=prompt.device))[:, -1].cpu().numpy()

    return torch.as_tensor(greedy_continuation(last_logits, prompt.cpu().numpy(), max_new_tokens), device=prompt.device)


def generated(model: CheckedModule, cfg: LMConfig, prompt: Tensor, new: int, **kwargs) -> Tensor:
    __tracebackhide__ = True
    out = model.method("generate", prompt, max_new_tokens=new, **kwargs)
    want = (prompt.shape[0], prompt.shape[1] + new)
    if not isinstance(out, Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ComponentFailure(f"{model}: generate returned {got}, the spec says (b, s0 + max_new_tokens) = {want}")
    return out


# ---------------------------------------------------------------------------------------------------
# The forward pass


def _param(value, option: str):
    """A parametrize value that needs ``option=value`` offered."""
    return pytest.param(value, marks=pytest.mark.needs(**{option: value}))


@pytest.mark.parametrize("tie", [_param(False, "tie_weights"), _param(True, "tie_weights")], ids=["untied", "tied"])
@pytest.mark.parametrize("positions", [_param("rope", "positions"), _param("learned", "positions")])
@given(data=st.data())
def test_decoder_only_lm_agrees_with_reference(impl, device, positions, tie, data):
    """The model's logits equal the spec's float64 reference with the same weights, with and without a
    right-padding mask, for RoPE and learned positions, tied and untied heads, and every offered norm,
    activation, bias and head layout.

    Hint: pre-norm layers (x + sublayer(norm(x))), then the final norm, then the head; with tie_weights
    the head is the embedding table itself; learned positions add rows 0 .. s - 1.
    """
    cfg = data.draw(configs(impl, positions=positions, tie=tie), label="cfg")
    mask = data.draw(optional_padding(impl.offers(LM), cfg.b, cfg.s), label="mask")
    model = cfg.build(impl, device)
    tokens = cfg.tokens(device)
    keep = None if mask is None else torch.as_tensor(mask, device=device)
    out = logits_of(model, cfg, tokens, **({} if keep is None else {"mask": keep}))
    assert_close(
        out, reference(model, cfg, tokens, keep), axes=AXES,
        claim=f"{cfg} agrees with the spec's reference (mask={mask!r})",
        hint="embed -> [positions] -> pre-norm causal layers -> final norm -> head (the embedding when tied).",
    )


@given(data=st.data())
def test_decoder_only_lm_is_causal_end_to_end(impl, device, data):
    """Changing the tokens after position p changes no logit at positions 0 .. p (exactly).

    Hint: every layer's self-attention must be causal; positions must not leak either (a learned table is
    added per position, never mixed across positions).
    """
    cfg = data.draw(configs(impl, min_s=2), label="cfg")
    cut = data.draw(st.integers(0, cfg.s - 2), label="last_unchanged_position")
    model = cfg.build(impl, device)
    tokens = cfg.tokens(device)
    changed = tokens.clone()
    shift = cfg.tokens(device, seed_shift=2)[:, cut + 1 :] % (cfg.n - 1) + 1  # 1 .. n - 1: a different token
    changed[:, cut + 1 :] = (tokens[:, cut + 1 :] + shift) % cfg.n
    assert_equal(
        logits_of(model, cfg, changed)[:, : cut + 1], logits_of(model, cfg, tokens)[:, : cut + 1], axes=AXES,
        claim=f"{cfg}: logits at positions <= {cut} ignore the tokens after it",
        hint="call the layers' self-attention with causal=True (bottom-right aligned).",
    )


# ---------------------------------------------------------------------------------------------------
# The KV cache at model level


HEADS = [pytest.param("mha", marks=pytest.mark.needs(n_kv_head=False)),
         pytest.param("mqa", marks=pytest.mark.needs(n_kv_head=True)),
         pytest.param("gqa", marks=pytest.mark.needs(n_kv_head=True))]


@pytest.mark.needs(cache=True)
@pytest.mark.parametrize("positions", [_param("rope", "positions"), _param("learned", "positions")])
@pytest.mark.parametrize("heads", HEADS)
@given(data=st.data())
def test_decoder_only_lm_cached_logits_equal_the_full_pass(impl, device, heads, positions, data):
    """For any split of a sequence into a prefill and later chunks (one token at a time included), the
    logits computed chunk by chunk with new_cache equal one full forward pass, for MHA, MQA and GQA with
    RoPE and with learned positions.

    Hint: a chunk starts at position cache[0].length: learned positions read rows from there, RoPE rotates
    at that offset, and every layer appends to its own cache before attending.
    """
    cfg = data.draw(configs(impl, heads=heads, positions=positions), label="cfg")
    chunks = data.draw(chunkings(cfg.s), label="chunks")
    model = cfg.build(impl, device)
    tokens = cfg.tokens(device)
    full = logits_of(model, cfg, tokens)
    cache = model.method("new_cache", batch_size=cfg.b, capacity=cfg.max_len)
    pieces = [logits_of(model, cfg, tokens[:, a:b], cache=cache) for a, b in split_points(cfg.s, chunks)]
    assert_close(
        torch.cat(pieces, dim=1), full, axes=AXES,
        claim=f"{cfg}: logits decoded in chunks {chunks} with a KV cache equal the full pass",
        hint="offset = cache[0].length for learned positions and RoPE; pass cache[i] to layer i.",
    )


@given(data=st.data())
def test_greedy_generation_with_cache_equals_without(impl, data):
    """generate(temperature=0) returns the greedy continuation of the model's own full forward pass
    (argmax of the last position, appended, repeated), with the cache and without it alike (a model
    without a cache: without it).

    Hint: with the cache, run the prompt once, then feed only the new token; without it, feed the whole
    sequence every step (the last token alone has no context).
    """
    cfg = data.draw(configs(impl, max_s=4, extra_len=3), label="cfg")
    new = data.draw(st.integers(1, 3), label="new")
    cfg = replace(cfg, max_len=cfg.s + new)  # the cache exactly fills the context
    model = cfg.build(impl)
    prompt = cfg.tokens()
    want = greedy_reference(model, prompt, new)
    for kwargs in cache_choices(impl):
        assert_equal(
            generated(model, cfg, prompt, new, **kwargs), want, axes="b s",
            claim=f"{cfg}: greedy generate({kwargs}) of {new} tokens is the greedy continuation",
            hint="temperature 0 is argmax of logits[:, -1]; cached decoding must give the full pass's logits.",
        )


@pytest.mark.needs(generator=True)
@given(data=st.data())
def test_seeded_sampling_is_reproducible(impl, data):
    """Sampling with a torch.Generator seeded alike gives the same tokens, whatever the global RNG did.

    Hint: pass generator= to torch.multinomial; the global RNG (torch.manual_seed) must not matter.
    """
    cfg = data.draw(configs(impl, max_s=3, extra_len=3), label="cfg")
    new = data.draw(st.integers(1, 3), label="new")
    sample_seed = data.draw(seeds(), label="sample_seed")
    temperature = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="temperature")
    kwargs = data.draw(st.sampled_from(cache_choices(impl)), label="cache")
    model = cfg.build(impl)
    prompt = cfg.tokens()
    runs = []
    for global_seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            gen = torch.Generator().manual_seed(sample_seed)
            runs.append(generated(model, cfg, prompt, new, temperature=temperature, generator=gen, **kwargs))
    assert_equal(
        runs[1], runs[0], axes="b s",
        claim=f"{cfg}: two samplings (T={temperature}, {kwargs}) with generator seed {sample_seed} agree",
        hint="draw with torch.multinomial(probs, 1, generator=generator), never from the global RNG.",
    )


@given(data=st.data())
def test_sampling_at_vanishing_temperature_is_greedy(impl, data):
    """softmax(logits / T) tends to the argmax as T -> 0: sampling at T = 1e-9 gives the greedy tokens
    (with a seeded generator where generate takes one, else from the global RNG).

    Hint: divide the logits by the temperature (do not multiply), then softmax and draw.
    """
    cfg = data.draw(configs(impl, max_s=3, extra_len=3), label="cfg")
    new = data.draw(st.integers(1, 3), label="new")
    sample_seed = data.draw(seeds(), label="sample_seed")
    model = cfg.build(impl)
    prompt = cfg.tokens()
    kwargs = {"generator": torch.Generator().manual_seed(sample_seed)} if impl.offers(LM).offers("generator") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        out = generated(model, cfg, prompt, new, temperature=1e-9, **kwargs)
    assert_equal(
        out, greedy_reference(model, prompt, new), axes="b s",
        claim=f"{cfg}: sampling {new} tokens at temperature 1e-9 picks the greedy tokens",
        hint="probabilities are softmax(logits / temperature).",
    )


@pytest.mark.needs(cache=True)
@given(data=st.data())
def test_new_cache_sizes_follow_spec(impl, data):
    """new_cache(batch_size=b, capacity=c) returns n_layer empty caches, each holding keys and values of
    (b, n_kv_head, c, head_dim) in the model's dtype: MQA and GQA caches are n_head / n_kv_head smaller.

    Hint: size the caches with n_kv_head (not n_head) and head_dim = d_model // n_head.
    """
    cfg = data.draw(configs(impl), label="cfg")
    capacity = data.draw(st.integers(1, 8), label="capacity")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    model = cfg.build(impl, dtype=dtype)
    caches = model.method("new_cache", batch_size=cfg.b, capacity=capacity)
    want = cache_storage_shape(batch_size=cfg.b, n_kv_head=cfg.kv_heads, head_dim=cfg.e, capacity=capacity)
    got = [(tuple(getattr(c, "keys", torch.empty(0)).shape), tuple(getattr(c, "values", torch.empty(0)).shape),
            getattr(getattr(c, "keys", None), "dtype", None), getattr(c, "length", None)) for c in caches]
    assert_true(
        got == [(want, want, dtype, 0)] * cfg.n_layer,
        claim=f"{cfg}: new_cache gives {cfg.n_layer} empty caches of (b, n_kv_head, capacity, head_dim) = {want}, {dtype}",
        detail=f"(keys shape, values shape, dtype, length) per cache: {got}",
        hint="one KVCache per layer, built with n_kv_head, head_dim, capacity and the model's dtype/device.",
    )


# ---------------------------------------------------------------------------------------------------
# Padding, weight tying, gradients


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_right_padded_batch_matches_each_sequence_alone(impl, device, data):
    """In a right-padded batch with its key padding mask, every real position gets the logits its
    sequence gets when run alone, whatever the padding tokens are.

    Hint: the mask is True for real tokens; it becomes mask[:, None, None, :] so that it masks keys.
    """
    cfg = data.draw(configs(impl), label="cfg")
    keep = data.draw(padding_masks(cfg.b, cfg.s), label="keep")
    model = cfg.build(impl, device)
    tokens = cfg.tokens(device)
    batch = logits_of(model, cfg, tokens, mask=torch.as_tensor(keep, device=device))
    for i, length in enumerate(keep.sum(axis=1).tolist()):
        alone = logits_of(model, cfg, tokens[i : i + 1, :length])
        assert_close(
            batch[i : i + 1, :length], alone, axes=AXES,
            claim=f"{cfg}: sequence {i} (length {length}) in a right-padded batch gets its own logits (keep={keep!r})",
            hint="True = real token; padding keys must get weight 0 and real keys must stay visible.",
        )


def _own_name(model: CheckedModule, canonical: str) -> str:
    return getattr(model.module, "canonical_names", {}).get(canonical, canonical)


@pytest.mark.needs(tie_weights=True)
@given(data=st.data())
def test_tied_head_is_the_embedding(impl, data):
    """With tie_weights=True the output head is the embedding table itself: the model has exactly the spec's
    parameters (no second (n, d) table), and the gradient with respect to embed.weight includes the head's
    use (it matches finite differences of a perturbation applied to the table).

    Hint: logits = x @ embed.weight.T (or head.weight = embed.weight, the same Parameter); not a copy, not
    embed.weight.detach().
    """
    cfg = data.draw(configs(impl, tie=True, max_n=6, max_s=4), label="cfg")
    model = cfg.build(impl)
    want = sum(int(np.prod(p.shape)) for p in model.expected_parameters().values())
    have = sum(p.numel() for p in model.module.parameters())  # shared parameters are counted once
    assert_true(
        have == want,
        claim=f"{cfg}: a tied model has exactly the spec's {want} parameter numbers",
        detail=f"it has {have} ({have - want:+d}); {sorted(n for n, _ in model.module.named_parameters())}",
        hint="do not create a head and copy the embedding into it: assign the same Parameter, or use it directly.",
    )
    name = _own_name(model, "embed.weight")
    table = dict(model.module.named_parameters())[name].detach()
    direction = torch.randn(table.shape, generator=torch.Generator().manual_seed(cfg.seed + 3), dtype=table.dtype)
    weights = torch.randn(cfg.b, cfg.s, cfg.n, generator=torch.Generator().manual_seed(cfg.seed + 4), dtype=table.dtype)
    tokens = cfg.tokens()

    def score(eps: Tensor) -> Tensor:
        out = torch.func.functional_call(model.module, {name: table + eps * direction}, (tokens,))
        return (out * weights).sum()

    gradcheck(score, (torch.zeros((), dtype=table.dtype),),
              claim=f"{cfg}: the gradient w.r.t. the tied table includes both uses (embedding and head)",
              hint="the head must use the embedding Parameter itself, not a detached view or a copy.")


@pytest.mark.requires("next_token_loss")
@given(data=st.data())
def test_every_lm_parameter_gets_a_finite_gradient_from_next_token_loss(impl, data):
    """Backpropagating next_token_loss gives every parameter of the model a finite gradient (read from the
    module's own parameters).

    Hint: a parameter without a gradient is not used in forward (a norm or head built but never applied).
    """
    cfg = data.draw(configs(impl, min_s=2), label="cfg")
    model = cfg.build(impl)
    tokens = cfg.tokens()
    loss = impl.function("next_token_loss")(logits_of(model, cfg, tokens), tokens)
    backward(loss, model)
    bad = sorted(name for name, p in model.module.named_parameters()
                 if p.grad is None or not bool(torch.isfinite(p.grad).all()))
    assert_true(
        not bad,
        claim=f"{cfg}: every parameter gets a finite gradient from next_token_loss",
        detail=f"no or non-finite gradient for {bad}",
        hint="every parameter must take part in the forward pass (the final norm, the head, every layer).",
    )
