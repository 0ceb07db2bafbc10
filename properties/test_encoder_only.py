"""Properties of the encoder-only model (BERT-like classifier / regressor). Spec: spec/encoder_only.py."""

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
from properties.strategies import Mask, optional_padding, padding_masks, seeds, tensor
from spec.encoder_only import encoder_only_model

pytestmark = pytest.mark.requires("EncoderOnlyModel")
MODEL = "EncoderOnlyModel"
TASKS = ["classification", "regression"]
ROOM = 3  # max_len = s + ROOM, so a property may append up to ROOM padding positions


@dataclass(frozen=True)
class EncoderOnlyCase:
    """Sizes of one model and batch (shape glossary: b batch, s positions, n vocabulary, h heads, e head width,
    f feed-forward width, c outputs), the seed of its weights and tokens, and its options (activation and
    eps are conventions: the implementation's own, never passed)."""

    b: int
    s: int
    n: int
    h: int
    e: int
    layers: int
    f: int
    c: int
    seed: int
    norm_first: bool = False
    dropout: float = 0.0
    activation: str = "relu"
    eps: float = 1e-5

    @property
    def d(self) -> int:
        return self.h * self.e

    def config(self) -> dict:
        return dict(vocab_size=self.n, d_model=self.d, n_head=self.h, n_layer=self.layers, d_ff=self.f,
                    max_len=self.s + ROOM, n_outputs=self.c, norm_first=self.norm_first, dropout=self.dropout)

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64) -> CheckedModule:
        return impl.build(MODEL, seed=self.seed, device=device, dtype=dtype, **self.config())

    def build_ours_alike(self, device="cpu", dtype=torch.float64) -> CheckedModule:
        """Ours in the same configuration, conventions included (a declared gelu or eps): the baseline."""
        return OURS.build(MODEL, seed=self.seed, device=device, dtype=dtype, **self.config(),
                          activation=self.activation, eps=self.eps)

    def reference(self, model: CheckedModule, tokens: Tensor, keep=None) -> np.ndarray:
        return encoder_only_model(model.canonical_numpy(), tokens.cpu().numpy(), n_head=self.h, n_layer=self.layers,
                                  norm_first=self.norm_first, mask=keep, activation=self.activation, eps=self.eps)

    def tokens(self, salt: int = 0, *, b: int | None = None, s: int | None = None, device="cpu") -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1 + salt)
        return torch.randint(0, self.n, (b or self.b, s or self.s), generator=gen).to(device)

    def __repr__(self) -> str:
        options = f", norm_first={self.norm_first}"
        options += f", activation={self.activation}" if self.activation != "relu" else ""
        options += f", eps={self.eps:g}" if self.eps != 1e-5 else ""
        return (f"EncoderOnlyModel case(b={self.b}, s={self.s}, n={self.n}, h={self.h}, e={self.e}, d={self.d}, "
                f"n_layer={self.layers}, f={self.f}, c={self.c}{options}, seed={self.seed})")


@draws_options(MODEL, norm_first=lambda case: case.norm_first)
@st.composite
def encoder_only_cases(draw, offers: Offers, *, min_s: int = 1, min_b: int = 1, min_c: int = 1,
                       min_f: int = 1) -> EncoderOnlyCase:
    """Tiny models of the options ``offers`` offers: vocabulary <= 11, 3 <= d_model <= 8, at most 2 layers,
    s <= 6; norm_first drawn, dropout, activation and eps the implementation's defaults.

    d_model >= 3 because a LayerNorm over 1 or 2 features leaves at most a sign: every post-norm state would
    be one of two points, and order or padding could not show in the output.
    """
    h = draw(st.integers(1, 2), label="h")
    return EncoderOnlyCase(
        b=draw(st.integers(min_b, 3), label="b"), s=draw(st.integers(min_s, 6), label="s"),
        n=draw(st.integers(3, 11), label="n"), h=h, e=draw(st.integers(-(-3 // h), 8 // h), label="e"),
        layers=draw(st.integers(1, 2), label="n_layer"), f=draw(st.integers(min_f, max(min_f, 8)), label="f"),
        c=draw(st.integers(min_c, 3), label="c"), seed=draw(seeds(), label="seed"),
        norm_first=draw(offers.strategy("norm_first"), label="norm_first"), dropout=offers.default("dropout"),
        activation=offers.default("activation"), eps=offers.default("eps"),
    )


# The shared strategy properties/strategies.optional_padding draws this family's padding-mask options;
# registered here so that the option meta test checks it per component.
draws_options(MODEL, kwargs={"b": 2, "n": 3}, mask=lambda keep: keep is not None)(optional_padding)


def cases(impl: Implementation, **kwargs) -> st.SearchStrategy[EncoderOnlyCase]:
    return encoder_only_cases(impl.offers(MODEL), **kwargs)


def run(model: CheckedModule, tokens: Tensor, mask: np.ndarray | Tensor | None = None) -> Tensor:
    """model(tokens, mask=...) with the spec's output shape (b, c) checked."""
    __tracebackhide__ = True
    if mask is None:
        out = model(tokens)
    else:
        out = model(tokens, mask=torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=tokens.device))
    want = (tokens.shape[0], model.config["n_outputs"])
    assert_true(tuple(out.shape) == want, claim=f"{model} returns (b, n_outputs) = {want}",
                detail=f"shape {tuple(out.shape)}", hint="pool over positions (b, s, d) -> (b, d) before the head.")
    return out


def task_loss(impl: Implementation, name: str):
    """The implementation's task loss (spec/tasks.py) where it provides one; else the same math in torch."""
    if name in COMPONENTS and impl.provides(name):
        return impl.function(name)
    return {"classification_loss": F.cross_entropy, "regression_loss": F.mse_loss}[name]


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_encoder_only_model_agrees_with_reference(impl, device, dtype, data):
    """The model's outputs equal the spec's float64 reference with the same weights, post- and pre-norm,
    padding included where the model takes a mask (float32 by the error-ratio rule against ours in the
    same configuration).

    Hint: learned positions 0 .. s - 1 are added to the token embeddings (no sqrt(d) scale), the padding mask
    goes to every layer as a KEY mask (b, 1, 1, s), a pre-norm stack ends with final_norm, and pooling is
    the mean over the real positions, not over all s and not the first token.
    """
    case = data.draw(cases(impl), label="case")
    keep = data.draw(optional_padding(impl.offers(MODEL), case.b, case.s), label="keep")
    model = case.build(impl, device, dtype)
    tokens = case.tokens(device=device)
    out = run(model, tokens, keep)
    baseline = run(case.build_ours_alike(device, dtype), tokens, keep)
    assert_close(out, case.reference(model, tokens, keep), baseline=baseline, axes="b c",
                 claim=f"{case} agrees with the spec's reference ({dtype}, keep={keep!r})",
                 hint="embed + pos, key-padding mask in every layer, final_norm only when norm_first, "
                 "mean over real positions, then the head (with bias).")


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_encoder_only_padding_content_does_not_change_the_output(impl, device, data):
    """Replacing the tokens at padding positions leaves the output bit-for-bit unchanged.

    Hint: padding must be hidden twice: as keys in every attention layer (mask[:, None, None, :]) and in the
    pooling (sum over real positions / number of real positions).
    """
    case = data.draw(cases(impl, min_s=2), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")
    model = case.build(impl, device)
    tokens = case.tokens(device=device)
    other = torch.where(torch.as_tensor(keep, device=device), tokens, case.tokens(salt=7, device=device))
    assert_equal(run(model, other, keep), run(model, tokens, keep), axes="b c",
                 claim=f"{case}: padding content does not change the output (keep={keep!r})",
                 hint="mask the attention keys AND the pooling; a mean over all s positions averages padding.")


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_encoder_only_padding_amount_does_not_change_the_output(impl, device, data):
    """Appending more padding positions leaves the output unchanged (up to float64 rounding).

    Hint: divide the pooled sum by the number of REAL positions, not by the padded length s.
    """
    case = data.draw(cases(impl), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")
    extra = data.draw(st.integers(1, ROOM), label="extra_padding")
    model = case.build(impl, device)
    tokens = case.tokens(device=device)
    longer = torch.cat([tokens, case.tokens(salt=5, s=extra, device=device)], dim=1)
    longer_keep = np.concatenate([keep, np.zeros((case.b, extra), dtype=bool)], axis=1).view(Mask)
    assert_close(run(model, longer, longer_keep), run(model, tokens, keep), axes="b c",
                 claim=f"{case}: {extra} more padding positions do not change the output (keep={keep!r})",
                 hint="pooling divides by mask.sum(1), the real length; padding keys get no attention weight.")


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_encoder_only_padded_batch_gives_each_sequence_its_own_output(impl, device, data):
    """In a right-padded batch, every sequence gets the output it gets alone, unpadded and without a mask."""
    case = data.draw(cases(impl, min_b=2), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")
    model = case.build(impl, device)
    tokens = case.tokens(device=device)
    together = run(model, tokens, keep)
    lengths = keep.sum(axis=1)
    alone = torch.cat([run(model, tokens[i : i + 1, : int(lengths[i])]) for i in range(case.b)])
    assert_close(together, alone, axes="b c",
                 claim=f"{case}: a padded batch gives each sequence its own output (lengths {lengths.tolist()})",
                 hint="a padded sequence must compute exactly what the unpadded one does: mask keys and pooling.")


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_encoder_only_position_rows_used_only_by_padding_get_zero_gradient(impl, data):
    """No positional information leaks from padding: if every sequence is shorter than s, the rows of the
    learned position table that only padding positions use get exactly zero gradient. The gradient is read
    through the module's own parameters (``CheckedModule.parameter_gradients``): a position table the
    model hands out as a view (a slice or transpose of its own tensor) has no ``.grad`` of its own."""
    case = data.draw(cases(impl, min_s=2), label="case")
    lengths = data.draw(st.lists(st.integers(1, case.s - 1), min_size=case.b, max_size=case.b), label="lengths")
    keep = (np.arange(case.s)[None, :] < np.asarray(lengths)[:, None]).view(Mask)
    longest = max(lengths)
    model = case.build(impl)
    out = run(model, case.tokens(), keep)
    backward((out * tensor(case.seed + 3, *out.shape, dtype=out.dtype, device="cpu")).sum(), model)
    grad = model.parameter_gradients()["pos.weight"]
    claim = (f"{case}: position rows {longest} .. {case.s - 1}, used only by padding, get exactly zero gradient "
             f"(lengths {lengths})")
    assert_true(grad is not None, claim=claim, detail="pos.weight got no gradient at all",
                hint="add pos.weight[:s] to the embeddings.")
    assert_equal(grad[longest : case.s], torch.zeros_like(grad[longest : case.s]), axes="s d", claim=claim,
                 hint="a padding position reaches the output only if its key is attended or it is pooled.")


@given(data=st.data())
def test_encoder_only_output_depends_on_token_order(impl, data):
    """Sanity: with learned positions, swapping two different tokens changes the output (beyond float64
    rounding). Without positions, attention and mean pooling would be blind to order."""
    case = data.draw(cases(impl, min_s=2), label="case")
    i, j = data.draw(st.lists(st.integers(0, case.s - 1), min_size=2, max_size=2, unique=True), label="swap")
    shift = data.draw(st.integers(1, case.n - 1), label="token_shift")
    tokens = case.tokens(b=1)
    tokens[0, j] = (tokens[0, i] + shift) % case.n  # two different tokens
    swapped = tokens.clone()
    swapped[0, [i, j]] = tokens[0, [j, i]]
    model = case.build(impl)
    out, out_swapped = run(model, tokens), run(model, swapped)
    change = (out - out_swapped).abs().max().item()
    bound = 1e-9 * (1 + out.abs().max().item())
    assert_true(change > bound, claim=f"{case}: swapping positions {i} and {j} changes the output",
                detail=f"largest change {change:.3g} <= float64 rounding {bound:.3g} for tokens {tokens.tolist()}",
                hint="add the learned position table (pos.weight[:s]) to the token embeddings.")


@pytest.mark.parametrize("task", TASKS)
@given(data=st.data())
def test_every_encoder_only_parameter_gets_a_finite_gradient(impl, task, data):
    """classification_loss (cross-entropy on the outputs as logits) and regression_loss (MSE on them as
    values) reach every parameter with a finite gradient, nonzero for every matrix.

    Hint: a parameter without gradient is built but never used (a final norm not applied) or cut off by
    .detach(); the key bias's gradient is exactly zero (softmax cancels it), which is fine. (Two classes or
    more, and d_ff >= 16 with several positions, so that some relu is active: few units can all be dead.)
    """
    case = data.draw(cases(impl, min_s=3, min_b=2, min_c=2, min_f=16), label="case")
    model = case.build(impl)
    out = run(model, case.tokens())
    gen = torch.Generator().manual_seed(case.seed + 11)
    if task == "classification":
        loss = task_loss(impl, "classification_loss")(out, torch.randint(0, case.c, (case.b,), generator=gen))
    else:
        loss = task_loss(impl, "regression_loss")(out, torch.randn(out.shape, generator=gen, dtype=out.dtype))
    backward(loss, model)
    assert_parameters_get_finite_gradients(
        dict(model.module.named_parameters()),
        claim=f"{case}: {task} reaches every parameter",
        hint="every parameter must be on the path from tokens to the output.")
