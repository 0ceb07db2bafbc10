"""Properties of direct preference optimization: sequence_logprobs and dpo_loss.
Spec: spec/preference_optimization.py (h = (pc - rc) - (pr - rr), the margin of the implicit rewards / beta).

PyTorch has no DPO function, so these run on ours (and a learner's); the PyTorch adapters skip them.
dpo_loss returns a tuple (loss, chosen_rewards, rejected_rewards), which the suite's one-tensor call wrapper
does not take: ``dpo`` below calls it through the same machinery (watchdog, inputs written in place, the
place it raised) and checks the tuple itself.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true, fail
from properties.options import Offers, draws_options
from properties.plugin import COMPONENTS, ComponentFailure, Implementation, backward, call_arguments, guarded_call
from properties.strategies import Mask, seeds, tensor
from spec import preference_optimization as spec

LOGPS, DPO = "sequence_logprobs", "dpo_loss"
OURS = Implementation("ours", implementations)  # the same-dtype baseline of the error-ratio rule


def as_numpy(*tensors: Tensor) -> tuple[np.ndarray, ...]:
    return tuple(t.detach().double().cpu().numpy() for t in tensors)


# --------------------------------------------------------------------------------------------------------
# What a property needs (the docstring is what a skip reason names)


def some_smoothing(value) -> bool:
    """a value > 0"""
    return value > 0


def any_value(value) -> bool:
    return True


# --------------------------------------------------------------------------------------------------------
# sequence_logprobs: cases


@dataclass(frozen=True)
class SequenceCase:
    """b sequences of s tokens over a vocabulary of n: [left padding] prompt response [right padding].
    mask (b, s) is the response mask; ``average`` the drawn average_log_prob."""

    b: int
    s: int
    n: int
    seed: int
    mask: np.ndarray
    average: bool

    def logits(self, dtype=torch.float64, device="cpu") -> Tensor:
        return tensor(self.seed, self.b, self.s, self.n, dtype=dtype, device=device, scale=2.0)

    def tokens(self, device="cpu") -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randint(self.n, (self.b, self.s), generator=gen).to(device)

    def response_mask(self, device="cpu") -> Tensor:
        return torch.as_tensor(np.asarray(self.mask), device=device)

    def __repr__(self) -> str:
        return (f"SequenceCase(b={self.b}, s={self.s}, n={self.n}, response_{self.mask!r}, "
                f"average_log_prob={self.average}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@draws_options(LOGPS, average_log_prob=lambda case: case.average)
@st.composite
def sequence_cases(draw, offers: Offers) -> SequenceCase:
    """Each row: left padding (0 or more), a prompt of >= 1 token, a response of >= 1 token, right padding;
    now and then response_mask[:, 0] is set too (the spec ignores it: nothing scores token 0)."""
    b = draw(st.integers(1, 3), label="b")
    s = draw(st.integers(2, 7), label="s")
    n = draw(st.integers(2, 8), label="n")
    mask = np.zeros((b, s), dtype=bool)
    for i in range(b):
        response = draw(st.integers(1, s - 1), label="response")
        prompt = draw(st.integers(1, s - response), label="prompt")
        start = draw(st.integers(0, s - response - prompt), label="left_padding") + prompt
        mask[i, start:start + response] = True
    if draw(st.booleans(), label="mask_at_0"):
        mask[:, 0] = True
    average = draw(offers.strategy("average_log_prob"), label="average_log_prob")
    return SequenceCase(b=b, s=s, n=n, seed=draw(seeds(), label="seed"), mask=mask.view(Mask), average=average)


def logps_of(impl: Implementation, case: SequenceCase, logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    return impl.function(LOGPS)(logits, tokens, mask, average_log_prob=case.average)


# --------------------------------------------------------------------------------------------------------
# sequence_logprobs: properties


@pytest.mark.requires(LOGPS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_sequence_logprobs_agrees_with_reference(impl, device, dtype, data):
    """sequence_logprobs equals the spec's float64 reference: the sum (or, with average_log_prob, the mean)
    of log_softmax(logits[:, t - 1])[tokens[:, t]] over the response tokens t >= 1.

    Hint: logits[:, :-1] score tokens[:, 1:]; keep the terms where response_mask[:, 1:] is True; sum them
    (the mean only with average_log_prob=True, over the response tokens, not over all positions).
    """
    case = data.draw(sequence_cases(impl.offers(LOGPS)), label="case")
    logits, tokens, mask = case.logits(dtype, device), case.tokens(device), case.response_mask(device)
    want = spec.sequence_logprobs(*as_numpy(logits), tokens.cpu().numpy(), case.mask, average_log_prob=case.average)
    assert_close(logps_of(impl, case, logits, tokens, mask), want, axes="b",
                 baseline=logps_of(OURS, case, logits, tokens, mask),
                 claim=f"sequence_logprobs agrees with the spec's reference ({case}, {dtype})",
                 hint="logits[:, :-1] score tokens[:, 1:]; only response tokens count (response_mask[:, 1:]); "
                 "sum them unless average_log_prob.")


@pytest.mark.requires(LOGPS)
@given(b=st.integers(1, 3), s=st.integers(2, 6), n=st.integers(2, 8), seed=seeds())
def test_sequence_logprobs_uses_the_pinned_shift(impl, device, b, s, n, seed):
    """With every token but the first in the response, logits whose position t puts all its mass on
    tokens[:, t + 1] give a log-probability of ~0, and logits peaked on tokens[:, t] (no shift) a large
    negative one. Consecutive tokens always differ here.

    Hint: the logits at position t have seen tokens 0 .. t and predict token t + 1: score tokens[:, 1:]
    with logits[:, :-1] (TRL's labels[:, 1:] against logits[:, :-1]), not each token with its own logits.
    """
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, n, (b, s), generator=gen)  # 1 .. n - 1, so tokens[t + 1] != tokens[t]
    tokens = (torch.cumsum(steps, dim=1) % n).to(device)
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # position t -> tokens[t + 1] (the last: anything)
    confident = 40.0
    peaked = lambda targets: confident * torch.nn.functional.one_hot(targets, n).to(torch.float64)  # noqa: E731
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    kwargs = {"average_log_prob": impl.offers(LOGPS).default("average_log_prob")}
    logps = impl.function(LOGPS)
    right, unshifted = logps(peaked(nxt), tokens, mask, **kwargs), logps(peaked(tokens), tokens, mask, **kwargs)
    assert_true(
        bool((right > -1e-12).all()) and bool((unshifted < -confident / 2).all()),
        claim=f"sequence_logprobs (b={b}, s={s}, n={n}, {kwargs}): logits[:, t] score tokens[:, t + 1]",
        detail=f"{right.tolist()} for logits peaked on tokens[:, t + 1] (should be ~0), {unshifted.tolist()} for "
        f"logits peaked on tokens[:, t] (should be far below {-confident / 2:g})",
        hint="gather log_softmax(logits[:, :-1]) at tokens[:, 1:]; not logits[:, 1:] against tokens[:, :-1], nor "
        "no shift.",
    )


@pytest.mark.requires(LOGPS)
@given(data=st.data())
def test_sequence_logprobs_ignores_prompt_and_padding_tokens(impl, device, data):
    """Changing the prompt and padding tokens (response_mask False), the logits that score them (and the
    last position's, which score nothing), and response_mask[:, 0] (token 0 cannot be scored) leaves the
    result bit for bit unchanged.

    Hint: keep only the terms where response_mask[:, 1:] is True, with weight exactly 0 elsewhere
    (torch.where); the mask is over tokens, so the logits that count are logits[:, t - 1] for a response
    token t. A mask applied to logits[:, :-1] by position (mask[:, :-1]) is one token off.
    """
    case = data.draw(sequence_cases(impl.offers(LOGPS)), label="case")
    logits, tokens, mask = case.logits(device=device), case.tokens(device), case.response_mask(device)
    counted = mask.clone()
    counted[:, 0] = False
    scoring = torch.cat([counted[:, 1:], torch.zeros_like(counted[:, :1])], dim=1)[..., None]  # logits that count
    logits2 = torch.where(scoring, logits, tensor(case.seed + 2, *logits.shape, dtype=logits.dtype, device=device,
                                                   scale=5.0))
    tokens2 = torch.where(counted, tokens, (tokens + 1) % case.n)
    mask2 = mask.clone()
    mask2[:, 0] = ~mask2[:, 0]
    assert_equal(
        logps_of(impl, case, logits2, tokens2, mask2), logps_of(impl, case, logits, tokens, mask), axes="b",
        claim=f"sequence_logprobs ignores prompt and padding tokens and the logits scoring them ({case})",
        hint="response_mask marks tokens: token t counts iff response_mask[:, t] (t >= 1), scored by logits[:, t - 1].",
    )


# --------------------------------------------------------------------------------------------------------
# dpo_loss: calling it, and cases


def dpo(impl: Implementation, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float,
        label_smoothing: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The implementation's dpo_loss(pc, pr, rc, rr, beta=..., label_smoothing=...): (loss, chosen_rewards,
    rejected_rewards), the rewards None where it declares rewards=False. An exception, an input written in
    place, another return type or shape, or a non-finite result for finite input is its failure."""
    __tracebackhide__ = True
    entry, fn, offers = COMPONENTS[DPO], impl.raw(DPO), impl.offers(DPO)
    args = (pc, pr, rc, rr)
    kwargs = call_arguments(offers, {"beta": beta, "label_smoothing": label_smoothing})
    call = f"dpo_loss(b={pc.shape[0]}, {str(pc.dtype).removeprefix('torch.')}, " + \
        ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    who = f"{impl.label}: {call}"
    out = guarded_call(entry, fn, impl.label, call, args, kwargs, offers=offers)
    with_rewards = offers.offers("rewards", True)
    if with_rewards:
        if not (isinstance(out, (tuple, list)) and len(out) == 3 and all(isinstance(t, Tensor) for t in out)):
            raise ComponentFailure(
                f"{who} returned {type(out).__name__}; the spec's dpo_loss returns (loss, chosen_rewards, "
                "rejected_rewards). If yours returns the loss alone, declare spec_options = {'rewards': False}")
        loss, chosen, rejected = out
    else:
        if not isinstance(out, Tensor):
            raise ComponentFailure(f"{who} returned {type(out).__name__}; it declares rewards=False, so it "
                                   "returns the loss alone, one tensor")
        loss, chosen, rejected = out, None, None
    returned = {name: t for name, t in (("loss", loss), ("chosen_rewards", chosen), ("rejected_rewards", rejected))
                if t is not None}
    want = lambda name: () if name == "loss" else tuple(pc.shape)  # noqa: E731
    wrong = [f"{name} {tuple(t.shape)} (should be {want(name)})" for name, t in returned.items()
             if tuple(t.shape) != want(name)]
    if wrong:
        raise ComponentFailure(f"{who} returned {', '.join(wrong)}: the loss is the mean over the batch, a 0-d "
                               "tensor; the rewards are one per pair")
    if all(bool(torch.isfinite(a).all()) for a in args):
        bad = [name for name, t in returned.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ComponentFailure(f"{who} returned non-finite {', '.join(bad)} for finite log-probabilities: "
                                   "log(sigmoid(x)) is -inf for x below about -745 (float64) or -104 "
                                   "(float32); use F.logsigmoid")
    return loss, chosen, rejected


@dataclass(frozen=True)
class PreferenceCase:
    """b preference pairs: four (b,) sequence log-probabilities (<= 0, of size ``scale``) from a seed."""

    b: int
    beta: float
    label_smoothing: float
    scale: float
    seed: int

    def logps(self, dtype=torch.float64, device="cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(policy_chosen, policy_rejected, ref_chosen, ref_rejected), four separate tensors."""
        values = -tensor(self.seed, 4, self.b, dtype=torch.float64, device="cpu", scale=self.scale).abs()
        return tuple(v.clone().to(device=device, dtype=dtype) for v in values)

    def call(self, impl: Implementation, *logps: Tensor, label_smoothing: float | None = None):
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        return dpo(impl, *logps, beta=self.beta, label_smoothing=smoothing)

    def margin(self) -> np.ndarray:
        return spec.margins(*as_numpy(*self.logps()))

    def __repr__(self) -> str:
        return (f"PreferenceCase(b={self.b}, beta={self.beta}, label_smoothing={self.label_smoothing}, "
                f"scale={self.scale}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@draws_options(DPO, label_smoothing=lambda case: case.label_smoothing)
@st.composite
def preference_cases(draw, offers: Offers, *, smoothing: Callable[[Any], bool] = any_value) -> PreferenceCase:
    """1 .. 4 pairs, beta in {0.1, 0.5, 1, 2}, an offered label_smoothing satisfying ``smoothing``, and
    log-probabilities of size 1, 10 or 1000 (summed over long responses, -1000 is ordinary; beta |h| then
    reaches thousands, where log(sigmoid(x)) overflows)."""
    b = draw(st.integers(1, 4), label="b")
    beta = draw(st.sampled_from([0.1, 0.5, 1.0, 2.0]), label="beta")
    smoothings = offers.where("label_smoothing", smoothing) or offers.offered("label_smoothing")
    label_smoothing = draw(st.sampled_from(smoothings), label="label_smoothing")
    scale = draw(st.sampled_from([1.0, 10.0, 1000.0]), label="scale")
    seed = draw(seeds(), label="seed")
    return PreferenceCase(b=b, beta=beta, label_smoothing=label_smoothing, scale=scale, seed=seed)


def negated_margin_shift(case: PreferenceCase) -> np.ndarray:
    """L(-h) - L(h) = (1 - 2 eps) beta h per pair; the loss is their mean."""
    return np.asarray((1 - 2 * case.label_smoothing) * case.beta * case.margin().mean())


# --------------------------------------------------------------------------------------------------------
# dpo_loss: properties


@pytest.mark.requires(DPO)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_dpo_loss_agrees_with_reference(impl, device, dtype, data):
    """dpo_loss equals the spec's float64 reference: the loss mean_i -(1 - eps) log sigmoid(beta h_i)
    - eps log sigmoid(-beta h_i), with h = (pc - rc) - (pr - rr), and the rewards beta (pc - rc) and
    beta (pr - rr); finite at log-probabilities of -1000.

    Hint: the argument order is (policy_chosen, policy_rejected, ref_chosen, ref_rejected); beta multiplies
    the whole margin; the batch is averaged; F.logsigmoid, not log(sigmoid(x)).
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    logps = case.logps(dtype, device)
    got, base = case.call(impl, *logps), case.call(OURS, *logps)
    want = spec.dpo_loss(*as_numpy(*logps), beta=case.beta, label_smoothing=case.label_smoothing)
    claim = f"dpo_loss agrees with the spec's reference ({case}, {dtype})"
    assert_close(got[0], want[0], baseline=base[0], claim=claim + ": the loss",
                 hint="mean over pairs of -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h), "
                 "h = (pc - rc) - (pr - rr).")
    for name, value, expected, baseline in zip(("chosen", "rejected"), got[1:], want[1:], base[1:]):
        if value is not None:
            assert_close(value, expected, baseline=baseline, axes="b", claim=claim + f": the {name} rewards",
                         hint=f"{name}_rewards = beta * (policy_{name} - ref_{name}).")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_dpo_loss_is_log_2_when_policy_equals_reference(impl, device, data):
    """When the policy's log-probabilities equal the reference's (the start of DPO training: the policy is
    a copy of the reference), the margin is 0, the loss is log 2 for every beta and label_smoothing, and
    both rewards are exactly 0.

    Hint: the margin compares log-ratios against the reference, (pc - rc) - (pr - rr); a loss of the policy
    log-probabilities alone, -logsigmoid(beta (pc - pr)), forgets the reference.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    pc, pr, _, _ = case.logps(device=device)
    loss, chosen, rejected = case.call(impl, pc, pr, pc.clone(), pr.clone())
    assert_close(loss, np.asarray(math.log(2)), claim=f"dpo_loss is log 2 = 0.693147 at policy = reference ({case})",
                 hint="subtract the reference: h = (pc - rc) - (pr - rr) is 0 here.")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is not None:
            assert_equal(value, torch.zeros_like(value), axes="b", claim=f"the {name} rewards are 0 at policy = "
                         f"reference ({case})", hint=f"{name}_rewards = beta * (policy_{name} - ref_{name}).")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_dpo_loss_depends_only_on_the_margin(impl, device, data):
    """Shifting both chosen log-probabilities by a (per pair), both rejected ones by c, both policy ones by d
    and both reference ones by e leaves h = (pc - rc) - (pr - rr), and so the loss, unchanged.

    Hint: beta multiplies the whole margin, beta ((pc - rc) - (pr - rr)); beta on one log-ratio only, or
    the policy and reference log-probabilities used apart, makes the loss depend on more than h.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    pc, pr, rc, rr = case.logps(device=device)
    a, c, d, e = tensor(case.seed + 1, 4, case.b, dtype=torch.float64, device=device, scale=5.0)
    loss = case.call(impl, pc, pr, rc, rr)[0]
    shifted = case.call(impl, pc + a + d, pr + c + d, rc + a + e, rr + c + e)[0]
    assert_close(shifted, as_numpy(loss)[0],
                 claim=f"dpo_loss depends on the margin h alone: shifting chosen, rejected, policy and reference "
                 f"pairs changes nothing ({case})",
                 hint="loss = -logsigmoid(beta * ((pc - rc) - (pr - rr))) (with eps: the two directions).")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_dpo_loss_at_opposite_margins_differs_by_minus_beta_h(impl, device, data):
    """L(h) - L(-h) = -(1 - 2 eps) beta h (the batch mean of it), since log sigmoid(x) - log sigmoid(-x) = x;
    -h is made by exchanging the policy and reference log-probabilities. With eps = 0: -beta h.

    Hint: the loss is -logsigmoid(+beta h): a flipped sign (-logsigmoid(-beta h)) rewards the rejected
    response, and beta missing or applied twice changes the slope.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    pc, pr, rc, rr = case.logps(device=device)
    at_h, at_minus_h = case.call(impl, pc, pr, rc, rr)[0], case.call(impl, rc, rr, pc, pr)[0]
    assert_close(at_minus_h - at_h, negated_margin_shift(case),
                 claim=f"dpo_loss: L(h) - L(-h) = -(1 - 2 eps) beta h ({case}; mean h {case.margin().mean():.6g})",
                 hint="loss = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h), h = (pc - rc) - (pr - rr).")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_swapping_chosen_and_rejected_negates_the_margin(impl, device, data):
    """dpo_loss(pr, pc, rr, rc) is L(-h) = L(h) + (1 - 2 eps) beta h (the batch mean), and its rewards are
    the original ones swapped: chosen_rewards <-> rejected_rewards, bit for bit.

    Hint: the two responses enter symmetrically, chosen with +, rejected with -: the rewards are
    beta * (policy - ref) for each, with the same sign.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    pc, pr, rc, rr = case.logps(device=device)
    loss, chosen, rejected = case.call(impl, pc, pr, rc, rr)
    swapped, chosen2, rejected2 = case.call(impl, pr, pc, rr, rc)
    assert_close(swapped - loss, negated_margin_shift(case),
                 claim=f"swapping chosen and rejected maps h to -h: L(-h) - L(h) = (1 - 2 eps) beta h ({case})",
                 hint="loss = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h), h = (pc - rc) - (pr - rr).")
    if chosen is not None:
        for name, value, other in (("chosen", chosen2, rejected), ("rejected", rejected2, chosen)):
            assert_equal(value, other, axes="b", claim=f"swapping chosen and rejected swaps the rewards: the "
                         f"{name} rewards of the swapped call ({case})",
                         hint="chosen_rewards = beta * (pc - rc) and rejected_rewards = beta * (pr - rr), same sign.")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected(impl, device, data):
    """d loss / d pc_i = -(beta / b) [(1 - eps) sigmoid(-beta h_i) - eps sigmoid(beta h_i)] = -d loss / d pr_i:
    descending it raises the chosen and lowers the rejected log-probability, with weight
    beta sigmoid(-beta h) at eps = 0 (most where the implicit reward ranks the pair wrongly).

    Hint: the loss must reach both policy log-probabilities through beta h inside the graph (no .detach()
    of the policy, no .item()); a flipped sign lowers the chosen one instead.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    pc, pr, rc, rr = case.logps(device=device)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    backward(case.call(impl, pc, pr, rc, rr)[0], f"{impl.label}: dpo_loss")
    want = spec.dpo_loss_gradient(*as_numpy(pc, pr, rc, rr), beta=case.beta, label_smoothing=case.label_smoothing)
    for name, x, expected in (("policy_chosen", pc, want[0]), ("policy_rejected", pr, want[1])):
        if x.grad is None:
            fail(f"dpo_loss's gradient reaches {name} ({case})", "no gradient at all (grad is None)",
                 "compute the loss from the policy log-probabilities inside the autograd graph.")
        assert_close(x.grad, expected, axes="b", claim=f"d loss / d {name} = {'-' if name.endswith('chosen') else ''}"
                     f"(beta / b) [(1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)] ({case})",
                     hint="loss = mean(-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)): mean over the batch, "
                     "beta on the whole margin.")


@pytest.mark.requires(DPO)
@given(data=st.data())
def test_dpo_loss_sends_no_gradient_to_the_reference(impl, device, data):
    """With reference log-probabilities that require grad (a frozen model run with autograd on), the loss
    sends them no gradient: dpo_loss detaches the reference itself.

    Hint: ref_chosen.detach() and ref_rejected.detach() inside dpo_loss; otherwise the reference model's
    parameters get gradients, and an optimizer that holds them moves the reference.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    logps = [x.requires_grad_(True) for x in case.logps(device=device)]
    backward(case.call(impl, *logps)[0], f"{impl.label}: dpo_loss")
    for name, x in (("ref_chosen", logps[2]), ("ref_rejected", logps[3])):
        largest = 0.0 if x.grad is None else float(x.grad.abs().max())
        assert_true(largest == 0.0, claim=f"dpo_loss sends no gradient to {name} ({case})",
                    detail=f"{name}.grad has entries up to {largest:.3g}",
                    hint="detach the reference log-probabilities inside dpo_loss.")


@pytest.mark.requires(DPO)
@pytest.mark.needs(rewards=True)
@given(data=st.data())
def test_dpo_implicit_rewards_carry_no_gradient(impl, device, data):
    """chosen_rewards and rejected_rewards are detached (logging quantities, as TRL's), even when every input
    requires grad.

    Hint: return beta * (policy - ref).detach(): rewards left in the graph keep it alive after the step,
    and one added to a loss by mistake would train the policy.
    """
    case = data.draw(preference_cases(impl.offers(DPO)), label="case")
    _, chosen, rejected = case.call(impl, *[x.requires_grad_(True) for x in case.logps(device=device)])
    attached = [name for name, t in (("chosen_rewards", chosen), ("rejected_rewards", rejected)) if t.requires_grad]
    assert_true(not attached, claim=f"dpo_loss's rewards carry no gradient ({case})",
                detail=f"{' and '.join(attached)} require grad", hint="detach the rewards.")


@pytest.mark.requires(DPO)
@pytest.mark.needs(label_smoothing=0.0)
@pytest.mark.needs(label_smoothing=some_smoothing)
@given(data=st.data())
def test_conservative_dpo_interpolates_the_two_directions(impl, device, data):
    """With label_smoothing eps > 0 (conservative DPO: a label is flipped with probability eps), the loss is
    (1 - eps) L_0(h) + eps L_0(-h), L_0 the loss at label_smoothing 0 and -h the swapped pair.

    Hint: -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h): weight 1 - eps on the stated preference;
    mix the log-likelihoods, not the probabilities.
    """
    case = data.draw(preference_cases(impl.offers(DPO), smoothing=some_smoothing), label="case")
    pc, pr, rc, rr = case.logps(device=device)
    eps = case.label_smoothing
    smoothed = case.call(impl, pc, pr, rc, rr)[0]
    forward, backward_ = case.call(impl, pc, pr, rc, rr, label_smoothing=0.0)[0], \
        case.call(impl, pr, pc, rr, rc, label_smoothing=0.0)[0]
    assert_close(smoothed, as_numpy((1 - eps) * forward + eps * backward_)[0],
                 claim=f"conservative DPO: L_eps(h) = (1 - eps) L_0(h) + eps L_0(-h) ({case})",
                 hint="weight 1 - eps on -logsigmoid(beta h) and eps on -logsigmoid(-beta h).")


# --------------------------------------------------------------------------------------------------------
# Learnability

SEED = 20240501
VOCAB, GOOD, PAD = 7, 5, 6  # body tokens 0 .. 4; the preferred last token GOOD; right padding PAD
PROMPT, MAX_RESPONSE = 3, 4


def preference_pairs(n: int, salt: int) -> tuple[Tensor, Tensor]:
    """(2n, s) tokens and response masks: n chosen rows, then their n rejected rows. A pair shares a prompt of
    3 tokens and a response length of 3 or 4 tokens (then padding); the responses are drawn apart, and end
    in GOOD when chosen, in another token when rejected."""
    gen = torch.Generator().manual_seed(SEED + salt)
    s = PROMPT + MAX_RESPONSE
    prompt = torch.randint(0, GOOD, (n, PROMPT), generator=gen).repeat(2, 1)
    last = torch.cat([torch.full((n,), GOOD), torch.randint(0, GOOD, (n,), generator=gen)])
    lengths = torch.randint(MAX_RESPONSE - 1, MAX_RESPONSE + 1, (n, 1), generator=gen).repeat(2, 1)
    ends = PROMPT + lengths  # one past each response
    pos = torch.arange(s)[None, :]
    tokens = torch.randint(0, GOOD, (2 * n, s), generator=gen)
    tokens = torch.where(pos == ends - 1, last[:, None], tokens)
    tokens = torch.where(pos >= ends, PAD, torch.cat([prompt, tokens[:, PROMPT:]], dim=1))
    return tokens, (pos >= PROMPT) & (pos < ends)


@pytest.mark.slow
@pytest.mark.requires(LOGPS, DPO)
def test_dpo_training_raises_held_out_preference_accuracy(impl):
    """A tiny DecoderOnlyLM (ours: d_model 16, 1 layer) trained 20 Adam steps with DPO (beta 0.5) against its
    frozen copy, to prefer responses that end in a given token, ranks at least 90% of held-out pairs right
    (policy - reference margin h > 0; measured 100%; every margin is 0 at the start) and its mean implicit
    reward margin beta h grows from 0 to at least 1 (measured 6.8). The implementation's sequence_logprobs
    and dpo_loss train it; the spec's log-probabilities judge it.

    Hint: a model that learns the opposite preference descends -logsigmoid(-beta h): the margin's sign is
    flipped. (A missing shift still teaches this preference in part: the shift has its own property,
    test_sequence_logprobs_uses_the_pinned_shift.)
    """
    policy = OURS.build("DecoderOnlyLM", seed=SEED, dtype=torch.float32, vocab_size=VOCAB, d_model=16, n_head=2,
                        n_layer=1, d_ff=32, max_len=PROMPT + MAX_RESPONSE).module
    reference = copy.deepcopy(policy).requires_grad_(False)
    (tokens, mask), (held_tokens, held_mask) = preference_pairs(512, salt=1), preference_pairs(256, salt=2)
    n, beta = len(tokens) // 2, 0.5
    smoothing = impl.offers(DPO).default("label_smoothing")  # 0 where offered
    logps = impl.function(LOGPS)
    with torch.no_grad():
        ref_logps = logps(reference(tokens), tokens, mask)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-2)
    order = torch.Generator().manual_seed(SEED + 99)
    losses = []
    policy.train()
    for _ in range(20):
        index = torch.randint(0, n, (32,), generator=order)
        rows = torch.cat([index, index + n])  # the chosen rows, then their rejected rows
        lp = logps(policy(tokens[rows]), tokens[rows], mask[rows])
        loss = dpo(impl, lp[:32], lp[32:], ref_logps[index], ref_logps[index + n], beta=beta,
                   label_smoothing=smoothing)[0]
        optimizer.zero_grad()
        backward(loss, f"{impl.label}: dpo_loss")
        optimizer.step()
        losses.append(loss.item())
    policy.eval()
    with torch.no_grad():
        judge = OURS.function(LOGPS)
        ratio = (judge(policy(held_tokens), held_tokens, held_mask)
                 - judge(reference(held_tokens), held_tokens, held_mask))  # log pi / ref per response
    h = ratio[:len(ratio) // 2] - ratio[len(ratio) // 2:]
    accuracy, margin = (h > 0).double().mean().item(), beta * h.mean().item()
    assert_true(accuracy >= 0.9 and margin >= 1.0,
                claim="a tiny LM trained with DPO against its frozen copy learns to prefer responses ending in a "
                "given token",
                detail=f"held-out preference accuracy {accuracy:.3f} (needed >= 0.9), mean reward margin beta h "
                f"{margin:.3f} (needed >= 1; 0 at the start); train loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                hint="the loss must fall as the chosen log-ratio rises above the rejected one: -logsigmoid(beta h).")
