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
from properties.plugin import CheckedModule, ComponentFailure, Implementation, backward
from properties.probes import gradcheck
from properties.strategies import chunkings, padding_masks, seeds
from spec.decoder_only import decoder_only_lm, greedy_continuation
from spec.kv_cache import cache_storage_shape, split_points

pytestmark = pytest.mark.requires("DecoderOnlyLM")
LM = "DecoderOnlyLM"
AXES = "b s n"


@dataclass(frozen=True)
class LMConfig:
    """Sizes of one model and its input, by the shape glossary: b batch, s positions, n vocabulary,
    h query heads, g key/value heads (None = MHA), e head width, f feed-forward width."""

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

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def ctor(self) -> dict:
        return dict(vocab_size=self.n, d_model=self.d, n_head=self.h, n_layer=self.n_layer, d_ff=self.f,
                    max_len=self.max_len, n_kv_head=self.g, positions=self.positions, norm=self.norm,
                    activation=self.activation, tie_weights=self.tie)

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
        return (f"DecoderOnlyLM(b={self.b}, s={self.s}, n={self.n}, h={self.h}, {heads}, e={self.e}, d={self.d}, "
                f"f={self.f}, n_layer={self.n_layer}, max_len={self.max_len}, positions={self.positions}, "
                f"norm={self.norm}, activation={self.activation}, tie={self.tie})")


@st.composite
def lm_configs(draw, *, heads: str = "any", positions: str | None = None, tie: bool | None = None,
               min_s: int = 1, max_s: int = 6, extra_len: int = 0, min_b: int = 1, max_n: int = 11) -> LMConfig:
    """A small model (d <= 8, n_layer <= 2, vocabulary <= 11) and input sizes.

    heads: "mha" (n_kv_head None), "mqa" (1), "gqa" (a proper divisor: h=4, g=2), or "any".
    Head widths are even so that RoPE applies. max_len >= s + extra_len (room for generated tokens).
    """
    if heads == "any":
        heads = draw(st.sampled_from(["mha", "mqa", "gqa"]), label="heads")
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
        positions=positions or draw(st.sampled_from(["rope", "learned"]), label="positions"),
        norm=draw(st.sampled_from(["rms", "layer"]), label="norm"),
        activation=draw(st.sampled_from(["swiglu", "relu", "gelu"]), label="activation"),
        tie=draw(st.booleans(), label="tie") if tie is None else tie,
        seed=draw(seeds(), label="seed"),
    )


def reference(model: CheckedModule, cfg: LMConfig, tokens: Tensor, mask: Tensor | None = None) -> np.ndarray:
    params = {k: v.detach().double().cpu().numpy() for k, v in model.canonical_state().items()}
    return decoder_only_lm(params, tokens.cpu().numpy(), n_head=cfg.h, n_layer=cfg.n_layer, max_len=cfg.max_len,
                           n_kv_head=cfg.g, positions=cfg.positions, norm=cfg.norm, activation=cfg.activation,
                           tie_weights=cfg.tie, mask=None if mask is None else mask.cpu().numpy())


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


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("positions", ["rope", "learned"])
@given(data=st.data())
def test_decoder_only_lm_agrees_with_reference(impl, device, positions, tie, data):
    """The model's logits equal the spec's float64 reference with the same weights, with and without a
    right-padding mask, for RoPE and learned positions, tied and untied heads.

    Hint: pre-norm layers (x + sublayer(norm(x))), then the final norm, then the head; with tie_weights
    the head is the embedding table itself; learned positions add rows 0 .. s - 1.
    """
    cfg = data.draw(lm_configs(positions=positions, tie=tie), label="cfg")
    mask = data.draw(st.none() | padding_masks(cfg.b, cfg.s), label="mask")
    model = cfg.build(impl, device)
    tokens = cfg.tokens(device)
    keep = None if mask is None else torch.as_tensor(mask, device=device)
    out = logits_of(model, cfg, tokens, **({} if keep is None else {"mask": keep}))
    assert_close(
        out, reference(model, cfg, tokens, keep), axes=AXES,
        claim=f"{cfg} agrees with the spec's reference (mask={mask!r})",
        hint="embed -> [positions] -> pre-norm causal layers -> final norm -> head (the embedding when tied).",
    )


@given(cfg=lm_configs(min_s=2), data=st.data())
def test_decoder_only_lm_is_causal_end_to_end(impl, device, cfg, data):
    """Changing the tokens after position p changes no logit at positions 0 .. p (exactly).

    Hint: every layer's self-attention must be causal; positions must not leak either (a learned table is
    added per position, never mixed across positions).
    """
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


HEADS = ["mha", "mqa", "gqa"]


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("heads", HEADS)
@given(data=st.data())
def test_decoder_only_lm_cached_logits_equal_the_full_pass(impl, device, heads, positions, data):
    """For any split of a sequence into a prefill and later chunks (one token at a time included), the
    logits computed chunk by chunk with new_cache equal one full forward pass, for MHA, MQA and GQA with
    RoPE and with learned positions.

    Hint: a chunk starts at position cache[0].length: learned positions read rows from there, RoPE rotates
    at that offset, and every layer appends to its own cache before attending.
    """
    cfg = data.draw(lm_configs(heads=heads, positions=positions), label="cfg")
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


@given(cfg=lm_configs(max_s=4, extra_len=3), new=st.integers(1, 3))
def test_greedy_generation_with_cache_equals_without(impl, cfg, new):
    """generate(temperature=0) returns the greedy continuation of the model's own full forward pass
    (argmax of the last position, appended, repeated), with the cache and without it alike.

    Hint: with the cache, run the prompt once, then feed only the new token; without it, feed the whole
    sequence every step (the last token alone has no context).
    """
    cfg = replace(cfg, max_len=cfg.s + new)  # the cache exactly fills the context
    model = cfg.build(impl)
    prompt = cfg.tokens()
    want = greedy_reference(model, prompt, new)
    for use_cache in (True, False):
        assert_equal(
            generated(model, cfg, prompt, new, use_cache=use_cache), want, axes="b s",
            claim=f"{cfg}: greedy generate(use_cache={use_cache}) of {new} tokens is the greedy continuation",
            hint="temperature 0 is argmax of logits[:, -1]; cached decoding must give the full pass's logits.",
        )


@given(cfg=lm_configs(max_s=3, extra_len=3), new=st.integers(1, 3), sample_seed=seeds(),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), use_cache=st.booleans())
def test_seeded_sampling_is_reproducible(impl, cfg, new, sample_seed, temperature, use_cache):
    """Sampling with a torch.Generator seeded alike gives the same tokens, whatever the global RNG did.

    Hint: pass generator= to torch.multinomial; the global RNG (torch.manual_seed) must not matter.
    """
    model = cfg.build(impl)
    prompt = cfg.tokens()
    runs = []
    for global_seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            gen = torch.Generator().manual_seed(sample_seed)
            runs.append(generated(model, cfg, prompt, new, temperature=temperature, generator=gen,
                                  use_cache=use_cache))
    assert_equal(
        runs[1], runs[0], axes="b s",
        claim=f"{cfg}: two samplings (T={temperature}, use_cache={use_cache}) with generator seed {sample_seed} agree",
        hint="draw with torch.multinomial(probs, 1, generator=generator), never from the global RNG.",
    )


@given(cfg=lm_configs(max_s=3, extra_len=3), new=st.integers(1, 3), sample_seed=seeds())
def test_sampling_at_vanishing_temperature_is_greedy(impl, cfg, new, sample_seed):
    """softmax(logits / T) tends to the argmax as T -> 0: sampling at T = 1e-9 gives the greedy tokens.

    Hint: divide the logits by the temperature (do not multiply), then softmax and draw.
    """
    model = cfg.build(impl)
    prompt = cfg.tokens()
    gen = torch.Generator().manual_seed(sample_seed)
    assert_equal(
        generated(model, cfg, prompt, new, temperature=1e-9, generator=gen), greedy_reference(model, prompt, new),
        axes="b s",
        claim=f"{cfg}: sampling {new} tokens at temperature 1e-9 picks the greedy tokens",
        hint="probabilities are softmax(logits / temperature).",
    )


@given(cfg=lm_configs(), capacity=st.integers(1, 8), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_new_cache_sizes_follow_spec(impl, cfg, capacity, dtype):
    """new_cache(batch_size=b, capacity=c) returns n_layer empty caches, each holding keys and values of
    (b, n_kv_head, c, head_dim) in the model's dtype: MQA and GQA caches are n_head / n_kv_head smaller.

    Hint: size the caches with n_kv_head (not n_head) and head_dim = d_model // n_head.
    """
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


@given(cfg=lm_configs(), data=st.data())
def test_right_padded_batch_matches_each_sequence_alone(impl, device, cfg, data):
    """In a right-padded batch with its key padding mask, every real position gets the logits its
    sequence gets when run alone, whatever the padding tokens are.

    Hint: the mask is True for real tokens; it becomes mask[:, None, None, :] so that it masks keys.
    """
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


@given(cfg=lm_configs(tie=True, max_n=6, max_s=4))
def test_tied_head_is_the_embedding(impl, cfg):
    """With tie_weights=True the output head is the embedding table itself: the model has exactly the spec's
    parameters (no second (n, d) table), and the gradient with respect to embed.weight includes the head's
    use (it matches finite differences of a perturbation applied to the table).

    Hint: logits = x @ embed.weight.T (or head.weight = embed.weight, the same Parameter); not a copy, not
    embed.weight.detach().
    """
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
@given(cfg=lm_configs(min_s=2))
def test_every_lm_parameter_gets_a_finite_gradient_from_next_token_loss(impl, cfg):
    """Backpropagating next_token_loss gives every parameter of the model a finite gradient.

    Hint: a parameter without a gradient is not used in forward (a norm or head built but never applied).
    """
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

