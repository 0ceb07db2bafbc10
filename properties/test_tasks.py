"""Properties of the task losses: next-token prediction, classification, regression. Spec: spec/tasks.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import Implementation
from properties.strategies import Mask, as_mask, seeds, tensor
import implementations
from spec import tasks as reference

OURS = Implementation("ours", implementations)


@draws_options("next_token_loss", mask=lambda batch: batch[4] is not None)
@st.composite
def lm_batches(draw, offers: Offers, *, min_s: int = 2, max_s: int = 6, min_real: int = 2):
    """(b, s, n, seed, mask): logits (b, s, n) and tokens (b, s) from seed; mask None or, where the loss
    takes one, right padding with at least ``min_real`` real tokens per row (so every row has a real target)."""
    b = draw(st.integers(1, 3), label="b")
    s = draw(st.integers(max(min_s, min_real), max_s), label="s")
    n = draw(st.integers(2, 11), label="n")
    seed = draw(seeds(), label="seed")
    mask = draw(right_padding(b, s, min_real), label="mask") if draw(offers.strategy("mask"), label="masked") else None
    return b, s, n, seed, mask


def right_padding(b: int, s: int, min_real: int = 2) -> st.SearchStrategy[np.ndarray]:
    """Right-padding masks (b, s), True = real token, with at least ``min_real`` real tokens per row."""
    lengths = st.lists(st.integers(min_real, s), min_size=b, max_size=b)
    return lengths.map(lambda ls: (np.arange(s)[None, :] < np.asarray(ls)[:, None]).view(Mask))


def tokens_for(seed: int, b: int, s: int, n: int, device) -> torch.Tensor:
    return torch.randint(n, (b, s), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.requires("next_token_loss")
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_next_token_loss_agrees_with_reference(impl, device, dtype, data):
    """next_token_loss equals the spec's float64 reference (mean cross-entropy of logits[:, t] against
    tokens[:, t + 1] over real targets) and, in float64, F.cross_entropy with ignore_index on padding.

    Hint: logits[:, :-1] predict tokens[:, 1:]; average over the real targets (mask[:, 1:]), not over all.
    """
    b, s, n, seed, mask = data.draw(lm_batches(impl.offers("next_token_loss")), label="batch")
    logits = tensor(seed, b, s, n, dtype=dtype, device=device, scale=2.0)
    tokens = tokens_for(seed + 1, b, s, n, device)
    keep = as_mask(mask, device)
    kwargs = {} if keep is None else {"mask": keep}
    out = impl.function("next_token_loss")(logits, tokens, **kwargs)
    baseline = OURS.function("next_token_loss")(logits, tokens, **kwargs)
    want = reference.next_token_loss(logits.double().cpu().numpy(), tokens.cpu().numpy(),
                                     mask=None if mask is None else mask)
    claim = f"next_token_loss(b={b}, s={s}, n={n}, {dtype}, mask={mask!r}) agrees with the spec's reference"
    hint = "shift: logits[:, :-1] vs tokens[:, 1:]; targets where mask[:, 1:] is True; mean over real targets."
    assert_close(out, want, baseline=baseline, claim=claim, hint=hint)
    if dtype == torch.float64:
        targets = tokens[:, 1:] if keep is None else tokens[:, 1:].masked_fill(~keep[:, 1:], -100)
        torch_loss = F.cross_entropy(logits[:, :-1].reshape(-1, n), targets.reshape(-1), ignore_index=-100)
        assert_close(out, torch_loss.detach().cpu().numpy(), claim=claim + " and F.cross_entropy", hint=hint)


@pytest.mark.requires("classification_loss")
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(b=st.integers(1, 4), c=st.integers(2, 6), seed=seeds())
def test_classification_loss_agrees_with_reference(impl, device, dtype, b, c, seed):
    """classification_loss equals the spec's float64 reference (mean cross-entropy over the batch) and, in
    float64, F.cross_entropy.

    Hint: log-softmax over the classes (the last axis), pick the label's entry, average over the batch.
    """
    logits = tensor(seed, b, c, dtype=dtype, device=device, scale=2.0)
    labels = tokens_for(seed + 1, 1, b, c, device)[0]
    out = impl.function("classification_loss")(logits, labels)
    baseline = OURS.function("classification_loss")(logits, labels)
    claim = f"classification_loss(b={b}, c={c}, {dtype}) agrees with the spec's reference"
    hint = "softmax over the class axis (-1), mean over the batch."
    assert_close(out, reference.classification_loss(logits.double().cpu().numpy(), labels.cpu().numpy()),
                 baseline=baseline, claim=claim, hint=hint)
    if dtype == torch.float64:
        assert_close(out, F.cross_entropy(logits, labels).cpu().numpy(), claim=claim + " and F.cross_entropy", hint=hint)


@pytest.mark.requires("regression_loss")
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(b=st.integers(1, 4), c=st.integers(1, 4), seed=seeds())
def test_regression_loss_agrees_with_reference(impl, device, dtype, b, c, seed):
    """regression_loss equals the spec's float64 reference (mean squared error over every entry) and, in
    float64, F.mse_loss.

    Hint: square the differences and average over all b * c entries (not a sum over outputs).
    """
    predictions = tensor(seed, b, c, dtype=dtype, device=device)
    targets = tensor(seed + 1, b, c, dtype=dtype, device=device)
    out = impl.function("regression_loss")(predictions, targets)
    baseline = OURS.function("regression_loss")(predictions, targets)
    claim = f"regression_loss(b={b}, c={c}, {dtype}) agrees with the spec's reference"
    hint = "mean over every entry of (b, c) of the squared difference."
    assert_close(out, reference.regression_loss(predictions.double().cpu().numpy(), targets.double().cpu().numpy()),
                 baseline=baseline, claim=claim, hint=hint)
    if dtype == torch.float64:
        assert_close(out, F.mse_loss(predictions, targets).cpu().numpy(), claim=claim + " and F.mse_loss", hint=hint)


@pytest.mark.requires("next_token_loss")
@given(b=st.integers(1, 3), s=st.integers(2, 6), n=st.integers(2, 11), seed=seeds())
def test_next_token_loss_uses_the_pinned_shift(impl, b, s, n, seed):
    """Logits that put all their mass on tokens[:, t + 1] at position t give a loss of ~0; logits that put
    it on tokens[:, t] (no shift) give a large loss. Consecutive tokens always differ here.

    Hint: position t predicts the NEXT token: cross_entropy(logits[:, :-1], tokens[:, 1:]).
    """
    steps = tokens_for(seed, b, s, n, "cpu") % (n - 1) + 1  # 1 .. n - 1, so tokens[t + 1] != tokens[t]
    tokens = torch.cumsum(steps, dim=1) % n
    confident = 40.0

    def peaked_on(targets: torch.Tensor) -> torch.Tensor:
        return confident * F.one_hot(targets, n).to(torch.float64)

    loss = impl.function("next_token_loss")
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # position t -> tokens[t + 1] (the last: anything)
    right, unshifted = float(loss(peaked_on(nxt), tokens)), float(loss(peaked_on(tokens), tokens))
    assert_true(
        right < 1e-12 and unshifted > confident / 2,
        claim=f"next_token_loss (b={b}, s={s}, n={n}): position t predicts tokens[:, t + 1]",
        detail=f"loss {right:.3g} for logits peaked on tokens[:, t + 1] (should be ~0), "
        f"{unshifted:.3g} for logits peaked on tokens[:, t] (should be ~{confident:g})",
        hint="compare logits[:, :-1] with tokens[:, 1:]; not logits[:, 1:] with tokens[:, :-1], nor no shift.",
    )


@pytest.mark.requires("next_token_loss")
@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_next_token_loss_ignores_padded_targets(impl, device, data):
    """Changing the logits at positions whose target is padding, and the padded tokens themselves, leaves
    the loss exactly unchanged.

    Hint: drop (or weight by exactly 0) every target with mask[:, t + 1] False, before the mean.
    """
    b, s, n, seed, mask = data.draw(lm_batches(impl.offers("next_token_loss")), label="batch")
    if mask is None:
        mask = data.draw(right_padding(b, s), label="keep")
    keep = as_mask(mask, device)
    logits = tensor(seed, b, s, n, dtype=torch.float64, device=device)
    tokens = tokens_for(seed + 1, b, s, n, device)
    padded_target = torch.cat([~keep[:, 1:], torch.ones_like(keep[:, :1])], dim=1)[..., None]  # (b, s, 1)
    logits2 = torch.where(padded_target, tensor(seed + 2, b, s, n, dtype=torch.float64, device=device, scale=5.0), logits)
    tokens2 = torch.where(keep, tokens, (tokens + 1) % n)
    loss = impl.function("next_token_loss")
    assert_equal(
        loss(logits2, tokens2, mask=keep), loss(logits, tokens, mask=keep),
        claim=f"next_token_loss (b={b}, s={s}, n={n}) ignores padded targets (mask={mask!r})",
        hint="targets with mask[:, 1:] False must not enter the sum nor the count.",
    )
