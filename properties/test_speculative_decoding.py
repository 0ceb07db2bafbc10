"""Properties of speculative decoding: residual_distribution, the speculative_accept kernel and
speculative_generate. Spec: spec/speculative_decoding.py (kd draft tokens per round, n vocabulary).

The kernel is random by design, so its distribution is judged statistically: one batched call draws N rows
from seeded p, q and draft tokens, and every (position, token) frequency and every acceptance count must lie
within Bernstein's bound for a false-alarm rate of at most 1e-6 per example (a union bound over the cells);
the seeds come from Hypothesis (derandomized in CI), so a run is deterministic. The exact parts of the claim
(the formula with the residual, the tokens a row may emit, a draft equal to the target) are checked exactly.

speculative_generate runs on two of our DecoderOnlyLMs (the models are fixtures, the algorithm is judged):
the target, and a draft that is another model, a smaller one or the target itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import implementations
from implementations.speculative_decoding import ForwardCounter
from properties.assertions import assert_close, assert_equal, assert_frequencies_follow, assert_true, fail
from properties.options import Offers, draws_options
from properties.plugin import COMPONENTS, ComponentFailure, Implementation, call_arguments, guarded_call
from properties.strategies import seeds
from properties.test_decoder_only import LM, LMConfig, greedy_reference, lm_configs
from spec import speculative_decoding as spec

ACCEPT, RESIDUAL, GENERATE = "speculative_accept", "residual_distribution", "speculative_generate"
OURS = Implementation("ours", implementations)  # the models speculative_generate runs on are ours
FALSE_ALARM = 1e-6  # per example, for the statistical check
SAMPLES = 4000  # rows of the kernel's batched call in the statistical check
RELATIONS = ("independent", "equal")


# ---------------------------------------------------------------------------------------------------
# Distributions


def distributions(seed: int, rows: int, n: int) -> np.ndarray:
    """(rows, n) probability rows from ``seed``: a softmax of N(0, 1.5^2) logits with about a third of the
    entries set to exactly zero (each row keeps its largest), so that p > 0 = q and q > 0 = p both occur."""
    rng = np.random.default_rng(seed)
    logits = 1.5 * rng.standard_normal((rows, n))
    keep = rng.random((rows, n)) >= 1 / 3
    keep[np.arange(rows), logits.argmax(axis=1)] = True
    weights = np.where(keep, np.exp(logits - logits.max(axis=1, keepdims=True)), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class PairCase:
    """Target rows p (rows, n) and draft rows q: drawn apart ("independent") or q = p ("equal")."""

    rows: int
    n: int
    seed: int
    relation: str

    def pair(self, p_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = distributions(self.seed, (p_rows or self.rows), self.n)
        q = p[: self.rows].copy() if self.relation == "equal" else distributions(self.seed + 1, self.rows, self.n)
        return p, q


@st.composite
def pair_cases(draw, *, max_rows: int = 3, max_n: int = 6, relation: str | None = None) -> PairCase:
    return PairCase(rows=draw(st.integers(1, max_rows), label="rows"), n=draw(st.integers(2, max_n), label="n"),
                    seed=draw(seeds(), label="seed"),
                    relation=relation or draw(st.sampled_from(RELATIONS), label="relation"))


@dataclass(frozen=True)
class KernelCase:
    """One batched speculative_accept call: the same p (kd + 1, n) and q (kd, n) in each of ``samples`` rows,
    draft tokens drawn from q per row, and the kernel's randomness from ``sample_seed`` (a generator where the
    call takes one, else the global RNG)."""

    pairs: PairCase
    sample_seed: int
    seeded: bool
    samples: int = SAMPLES

    @property
    def kd(self) -> int:
        return self.pairs.rows

    def inputs(self, device) -> tuple[Tensor, Tensor, Tensor]:
        p, q = self.pairs.pair(self.kd + 1)
        p_t, q_t = (torch.as_tensor(a, device=device) for a in (p, q))
        gen = torch.Generator().manual_seed(self.sample_seed + 1)
        drafts = torch.stack([torch.multinomial(torch.as_tensor(row), self.samples, replacement=True, generator=gen)
                              for row in q], dim=1).to(device)  # (samples, kd): each row's tokens drawn from q
        return (p_t.expand(self.samples, -1, -1).contiguous(), q_t.expand(self.samples, -1, -1).contiguous(), drafts)

    def __repr__(self) -> str:
        return (f"speculative_accept(p ({self.samples}, kd + 1 = {self.kd + 1}, n = {self.pairs.n}), q from "
                f"{self.pairs.relation} seed {self.pairs.seed}, sample_seed={self.sample_seed}, "
                f"generator={'given' if self.seeded else 'none (global RNG)'})")


@draws_options(ACCEPT, generator=lambda case: case.seeded)
@st.composite
def kernel_cases(draw, offers: Offers, *, relation: str | None = None) -> KernelCase:
    """kd in 1 .. 3 draft positions, n in 2 .. 5 tokens, p and q as ``pair_cases``, and whether the call gets
    a generator (where offered)."""
    return KernelCase(draw(pair_cases(max_n=5, relation=relation), label="pairs"), draw(seeds(), label="sample_seed"),
                      draw(offers.strategy("generator"), label="seeded"))


def accepted_rows(impl: Implementation, case: KernelCase, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(p, q, draft tokens, the kernel's output), seeded as the case says; the output layout is checked."""
    __tracebackhide__ = True
    p, q, drafts = case.inputs(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.sample_seed)
        if case.seeded:
            gen = torch.Generator(device=device).manual_seed(case.sample_seed)
            out = impl.function(ACCEPT)(p, q, drafts, generator=gen)
        else:  # random by design: not through the wrapper's repeat probe, which would call it non-deterministic
            out = guarded_call(COMPONENTS[ACCEPT], impl.raw(ACCEPT), impl.label, ACCEPT, (p, q, drafts), {})
    if not isinstance(out, Tensor) or tuple(out.shape) != (case.samples, case.kd + 1):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ComponentFailure(f"{impl}: {case} returned {got}; the spec says tokens (b, kd + 1) = "
                               f"{(case.samples, case.kd + 1)}")
    check_layout(out.cpu(), drafts.cpu(), case)
    return p, q, drafts, out.cpu()


def check_layout(out: Tensor, drafts: Tensor, case: KernelCase) -> None:
    """Each row: a accepted draft tokens (the draft's own, in order), one emitted token in 0 .. n - 1, then -1."""
    __tracebackhide__ = True
    if out.dtype != torch.long:
        raise ComponentFailure(f"{case}: returned {out.dtype}; the spec's tokens are torch.long")
    kd, emitted = case.kd, out >= 0
    lengths = emitted.sum(dim=1)
    gaps = int(((emitted != (torch.arange(kd + 1) < lengths[:, None])).any(dim=1) | (lengths == 0)).sum())
    outside = int(((out >= case.pairs.n) | (out < -1)).sum())
    taken = torch.arange(kd) < (lengths - 1)[:, None]  # positions holding accepted draft tokens
    not_drafts = int((out[:, :kd][taken] != drafts[taken]).sum())
    assert_true(
        gaps == outside == not_drafts == 0,
        claim=f"{case}: every row holds its accepted draft tokens, one emitted token, then -1 padding",
        detail=(f"{gaps} rows with no token or a -1 before a token; {outside} tokens outside 0 .. {case.pairs.n - 1} "
                f"and -1; {not_drafts} accepted tokens that are not the row's draft tokens"),
        hint="tokens[i, :a] = draft_tokens[i, :a], tokens[i, a] = the residual sample (or the bonus token when "
             "a = kd), tokens[i, a + 1:] = -1.",
    )


# ---------------------------------------------------------------------------------------------------
# residual_distribution and the kernel


@pytest.mark.parametrize("component", [RESIDUAL])
@given(case=pair_cases())
def test_residual_distribution_makes_speculative_sampling_exact(impl, device, component, case):
    """With the residual r it returns, accepting x ~ q with probability min(1, p/q) and else drawing from r
    emits y with probability min(p(y), q(y)) + (1 - sum min(p, q)) r(y), which equals p(y) (float64), and
    r is a distribution (nonnegative, summing to 1), also for q with zeros where p > 0 and the reverse, and
    for p == q (where r is never sampled but must stay finite).

    Hint: r = max(0, p - q) / sum(max(0, p - q)): clamp at zero (not abs), normalize, and where p == q
    (a zero sum) return p instead of 0/0.
    """
    p_np, q_np = case.pair()
    p, q = torch.as_tensor(p_np, device=device), torch.as_tensor(q_np, device=device)
    r = impl.function(RESIDUAL)(p, q)
    assert_true(bool((r >= 0).all()), claim=f"{case}: residual_distribution is nonnegative",
                detail=f"its smallest entry is {r.min().item():.3g}",
                hint="clamp p - q at zero (max(0, p - q)), not abs.")
    assert_close(r.sum(dim=-1), np.ones(case.rows), axes="row",
                 claim=f"{case}: residual_distribution sums to 1 per row",
                 hint="divide max(0, p - q) by its sum; where the sum is 0 (p == q) return p.")
    assert_close(
        torch.as_tensor(spec.emitted_distribution(p_np, q_np, r.detach().cpu().numpy())), p_np, axes="row y",
        claim=f"{case}: min(p, q) + (1 - sum min(p, q)) r equals p (the rule emits the target's distribution)",
        hint="the residual is the target's mass the draft under-proposed: max(0, p - q), normalized; sampling "
             "from p itself double-counts the accepted mass.",
    )


@pytest.mark.parametrize("component", [ACCEPT])
@given(data=st.data())
def test_speculative_accept_emits_the_target_distribution(impl, device, component, data):
    """At every position j a row reaches, the token it emits is distributed as p[:, j] (the residual sample at
    a rejection, the draft token when accepted, the bonus token after kd acceptances), draft token j is
    accepted with probability sum min(p_j, q_j), and a token with p_j = 0 is never emitted there. Checked on
    4000 seeded rows: every frequency within Bernstein's bound (false alarm at most 1e-6 per example).

    Hint: accept iff u < p(x) / q(x) with p the TARGET's row for that same position; on rejection draw from
    max(0, p - q) normalized; with all kd accepted draw the bonus from p[:, kd].
    """
    case = data.draw(kernel_cases(impl.offers(component)), label="case")
    p, q, _, out = accepted_rows(impl, case, device)
    p_np, q_np = p[0].cpu().numpy(), q[0].cpu().numpy()
    kd, n = case.kd, case.pairs.n
    cells = (kd + 1) * n + kd
    for j in range(kd + 1):
        reached = out[:, j] >= 0
        tokens = out[reached, j].numpy()
        impossible = tokens[p_np[j, tokens] == 0]
        assert_true(impossible.size == 0,
                    claim=f"{case}: position {j} never emits a token the target gives probability 0",
                    detail=f"it emitted token {impossible[:1].tolist()} there {impossible.size} times",
                    hint="accept iff u < p/q (strict), so p = 0 is never accepted; max(0, p - q) is 0 there too.")
        trials = int(reached.sum())
        assert_frequencies_follow(
            np.bincount(tokens, minlength=n), p_np[j], trials, false_alarm=FALSE_ALARM / cells,
            what=f"position {j}, token {{}}", claim=f"{case}: the token emitted at position {j} is distributed as p[:, {j}]",
            hint="p[:, j] verifies draft token j; the residual is norm(max(0, p_j - q_j)); the bonus comes from "
                 "p[:, kd].")
        if j < kd and trials:
            assert_frequencies_follow(
                np.array([int((out[reached, j + 1] >= 0).sum())]),
                np.array([spec.acceptance_probability(p_np[j], q_np[j])]), trials,
                false_alarm=FALSE_ALARM / cells, what=f"draft token {j} accepted", claim=(
                    f"{case}: draft token {j} is accepted with probability sum min(p_{j}, q_{j}) = "
                    f"{spec.acceptance_probability(p_np[j], q_np[j]):.4f}"),
                hint="accept with probability min(1, p(x)/q(x)), not min(1, q(x)/p(x)).")


@pytest.mark.parametrize("component", [ACCEPT])
@given(data=st.data())
def test_speculative_accept_takes_every_token_of_a_draft_equal_to_the_target(impl, device, component, data):
    """With q = p at every draft position (p/q = 1), every row accepts all kd draft tokens and adds a bonus
    token drawn from p[:, kd]: no -1 anywhere.

    Hint: accept iff u < p/q with u in [0, 1) (a ratio of exactly 1 always accepts); after kd acceptances emit
    the bonus token from p[:, kd] (the last target row, which the verifying pass already computed).
    """
    case = replace(data.draw(kernel_cases(impl.offers(component), relation="equal"), label="case"), samples=64)
    *_, out = accepted_rows(impl, case, device)
    short = ~(out >= 0).all(dim=1)
    if short.any():
        fail(f"{case}: a draft equal to the target keeps all {case.kd} tokens and a bonus token",
             f"{int(short.sum())} of {case.samples} rows stopped early; the first: {out[short][0].tolist()}",
             "compare u < p/q strictly with u ~ U[0, 1); when nothing is rejected, draw the bonus from p[:, kd].")


# ---------------------------------------------------------------------------------------------------
# speculative_generate


@dataclass(frozen=True)
class GenerateCase:
    """A target model, a draft (another model of the same sizes, a one-layer model of width 2, or the target
    itself), a (1, s0) prompt, max_new_tokens, k, and greedy decoding or sampling (temperature, seed)."""

    target: LMConfig
    draft: str
    new: int
    k: int
    temperature: float | None
    sample_seed: int

    def models(self):
        target = self.target.build(OURS)
        if self.draft == "target":
            return target, target.module
        cfg = replace(self.target, seed=self.target.seed + 1000)
        if self.draft == "smaller":
            cfg = replace(cfg, n_layer=1, h=1, g=None, e=2, f=2)
        return target, cfg.build(OURS).module

    def prompt(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.target.seed + 1)
        return torch.randint(self.target.n, (1, self.target.s), generator=gen)

    def kwargs(self) -> dict:
        if self.temperature is None:
            return {}
        return {"temperature": self.temperature, "generator": torch.Generator().manual_seed(self.sample_seed)}

    def __repr__(self) -> str:
        mode = "greedy" if self.temperature is None else f"sampling at T={self.temperature:g}"
        return (f"speculative_generate(target={self.target}, draft={self.draft}, prompt (1, {self.target.s}), "
                f"max_new_tokens={self.new}, k={self.k}, {mode})")


@draws_options(GENERATE, sampling=lambda case: case.temperature is not None)
@st.composite
def generate_cases(draw, offers: Offers, *, drafts=("other", "smaller", "target"), temperature: float = 1e-9,
                   max_new: int = 6) -> GenerateCase:
    """A small target (prompt length s0 = 1 .. 4, max_len = s0 + max_new_tokens exactly: proposals must stop
    at the end), a draft kind, k in 1 .. 5, and greedy decoding or sampling at ``temperature`` where offered."""
    new = draw(st.integers(2, max_new), label="max_new_tokens")
    target = draw(lm_configs(OURS.offers(LM), max_s=4), label="target")
    target = replace(target, b=1, max_len=target.s + new)
    sampling = draw(offers.strategy("sampling"), label="sampling")
    return GenerateCase(target=target, draft=draw(st.sampled_from(drafts), label="draft"), new=new,
                        k=draw(st.integers(1, 5), label="k"), temperature=temperature if sampling else None,
                        sample_seed=draw(seeds(), label="sample_seed"))


def speculated(impl: Implementation, case: GenerateCase, target: ForwardCounter, draft: ForwardCounter, *,
               counting: bool = False) -> Tensor:
    """The implementation's speculative_generate on the case's prompt; the models are passed inside counting
    wrappers (which also keep a report from printing their whole module tree). ``counting``: the caller
    reads the counters, so the call goes without the wrapper's repeat probe (the first checked call of a
    component runs it again, and the counters would count those runs too)."""
    __tracebackhide__ = True
    args, kwargs = (target, draft, case.prompt()), dict(max_new_tokens=case.new, k=case.k, **case.kwargs())
    if not counting:
        return impl.function(GENERATE)(*args, **kwargs)
    offers = impl.offers(GENERATE)
    out = guarded_call(COMPONENTS[GENERATE], impl.raw(GENERATE), impl.label, GENERATE, args,
                       call_arguments(offers, kwargs), offers=offers)
    if not isinstance(out, Tensor):
        raise ComponentFailure(f"{impl}: {GENERATE} returned a {type(out).__name__}; the spec's returns the tokens, "
                               "one tensor")
    return out


@pytest.mark.parametrize("component", [GENERATE])
@given(data=st.data())
def test_greedy_speculative_decoding_returns_the_targets_greedy_tokens(impl, component, data):
    """Greedy speculative decoding returns exactly the target's greedy continuation (argmax of its own
    full forward pass, appended, repeated) whatever the draft proposes (another model, a smaller one, the
    target itself), for any k in 1 .. 5 and prompt length; sampling at temperature 1e-9 (where offered) too.

    Hint: the target's logits at the prefix and after each proposal verify proposal j with row j; at the
    first mismatch emit the target's token, not the draft's; then roll every cache back to the accepted
    length (KVCache.length) so rejected proposals leave the context; propose min(k, still to emit - 1).
    """
    case = data.draw(generate_cases(impl.offers(component)), label="case")
    target, draft = case.models()
    want = greedy_reference(target, case.prompt(), case.new)
    got = speculated(impl, case, ForwardCounter(target.module, "target"), ForwardCounter(draft, "draft"))
    assert_equal(got, want, axes="b s",
                 claim=f"{case}: returns the target's greedy tokens (the prompt is positions 0 .. {case.target.s - 1})",
                 hint="verify proposal j with the target's row j (row 0 follows the prefix), emit the target's "
                      "token at the first mismatch, and roll the caches back to the accepted length.")


@pytest.mark.parametrize("component", [GENERATE])
@given(data=st.data())
def test_a_draft_equal_to_the_target_needs_one_target_forward_per_k_plus_1_tokens(impl, component, data):
    """With the target as its own draft every proposal is accepted, so each round emits k + 1 tokens (the k
    proposals and a bonus token) and the target runs ceil(max_new_tokens / (k + 1)) times, its prompt prefill
    included (greedy, and sampling at T = 1 where offered).

    Hint: verify the k proposals in ONE target forward (the prompt goes in with the first round's proposals);
    when all are accepted, the last row of that forward gives a bonus token for free.
    """
    cases = generate_cases(impl.offers(component), drafts=("target",), temperature=1.0, max_new=8)
    case = data.draw(cases, label="case")
    target, _ = case.models()
    counted_target, counted_draft = ForwardCounter(target.module, "target"), ForwardCounter(target.module, "draft")
    speculated(impl, case, counted_target, counted_draft, counting=True)
    want = spec.target_forwards_when_all_accepted(case.new, case.k)
    assert_true(counted_target.calls == want,
                claim=f"{case}: the target runs ceil({case.new} / ({case.k} + 1)) = {want} times",
                detail=f"it ran {counted_target.calls} times, fed {counted_target.tokens} tokens in all",
                hint="one target forward per round over the unseen tokens and all proposals; emit the bonus token "
                     "when every proposal is accepted.")
