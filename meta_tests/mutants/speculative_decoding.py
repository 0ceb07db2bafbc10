"""Mutants of speculative decoding: the accept/reject, residual and cache bugs that speculative decoders ship
with. ``buggy_accept`` is our kernel with one branch per bug; the speculative_generate mutants override one
step of ``SpeculativeDecoding``, so each reads as a near miss."""

from __future__ import annotations

import torch

from implementations.speculative_decoding import PAD, SpeculativeDecoding, emitted_tokens, stop_distribution
from meta_tests.catalog import mutant

EMITS_P = "test_speculative_accept_emits_the_target_distribution"
EQUAL_DRAFT = "test_speculative_accept_takes_every_token_of_a_draft_equal_to_the_target"
RESIDUAL_EXACT = "test_residual_distribution_makes_speculative_sampling_exact"
GREEDY = "test_greedy_speculative_decoding_returns_the_targets_greedy_tokens"
FORWARDS = "test_a_draft_equal_to_the_target_needs_one_target_forward_per_k_plus_1_tokens"


def buggy_accept(bug: str):
    def speculative_accept(p, q, draft_tokens, *, generator=None):
        b, kd = draft_tokens.shape
        index = draft_tokens[..., None]
        verifier = p[:, 1:] if bug == "verified_by_the_next_row" else p[:, :kd]  # row j + 1 checks token j
        p_x = verifier.gather(-1, index).squeeze(-1)
        q_x = q.gather(-1, index).squeeze(-1)
        u = torch.rand((b, kd), generator=generator, dtype=p.dtype, device=p.device)
        # min(1, q/p) keeps what the draft likes more than the target
        accepted = u * p_x < q_x if bug == "ratio_inverted" else u * q_x < p_x
        n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
        if bug == "residual_is_p":
            dist = p[torch.arange(b), n_accepted]  # a rejection is replaced from p itself
        else:
            dist = stop_distribution(p, q, n_accepted)
        nxt = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
        if bug == "no_bonus_token":
            nxt = torch.where(n_accepted < kd, nxt, PAD)  # all kd accepted: nothing more is emitted
        return emitted_tokens(draft_tokens, n_accepted, nxt)

    return speculative_accept


for _bug, _what, _caught in [
    ("ratio_inverted", "accepts with probability min(1, q/p) instead of min(1, p/q)", [EMITS_P]),
    ("residual_is_p", "a rejected token is replaced by a sample of p, not of max(0, p - q)", [EMITS_P]),
    ("no_bonus_token", "when every draft token is accepted, no bonus token is drawn", [EQUAL_DRAFT, EMITS_P]),
    ("verified_by_the_next_row", "draft token j is checked against p[:, j + 1] (off by one)", [EMITS_P]),
]:
    mutant(name=f"speculative_accept_{_bug}", bug=_what, provides="speculative_accept", caught_by=_caught)(
        buggy_accept(_bug))


@mutant(name="residual_distribution_not_normalized", bug="returns max(0, p - q) without dividing by its sum",
        provides="residual_distribution", caught_by=[RESIDUAL_EXACT])
def _not_normalized(p, q):
    return (p - q).clamp(min=0)


@mutant(name="residual_distribution_is_p", bug="the residual is the target's p itself",
        provides="residual_distribution", caught_by=[RESIDUAL_EXACT])
def _is_p(p, q):
    return p.clone()


@mutant(name="residual_distribution_abs", bug="normalizes |p - q| instead of max(0, p - q)",
        provides="residual_distribution", caught_by=[RESIDUAL_EXACT])
def _absolute(p, q):
    excess = (p - q).abs()
    total = excess.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, excess / total.clamp(min=1e-300), p)


@mutant(name="residual_distribution_nan_when_p_equals_q", bug="divides by the sum without a guard: 0/0 when p == q",
        provides="residual_distribution", caught_by=[RESIDUAL_EXACT])
def _unguarded(p, q):
    excess = (p - q).clamp(min=0)
    return excess / excess.sum(dim=-1, keepdim=True)


def generate_with(decoding: type[SpeculativeDecoding]):
    def speculative_generate(target, draft, prompt, *, max_new_tokens, k, temperature=0.0, generator=None):
        with torch.no_grad():
            return decoding(target, draft, prompt, max_new_tokens=max_new_tokens, k=k, temperature=temperature,
                            generator=generator).run()

    return speculative_generate


class _NoRollback(SpeculativeDecoding):
    """Tracks the accepted length but leaves the rejected proposals in both KV caches: the next round appends
    after them, so the target reads a context that never was (and positions shifted by them)."""

    def roll_back(self, valid):
        self.target_seen, self.draft_seen = min(self.target_seen, valid), min(self.draft_seen, valid)


class _VerifiedByTheNextRow(SpeculativeDecoding):
    """Pairs proposal j with the target's row after it (the row that predicts proposal j + 1)."""

    def verify(self, proposals):
        logits = super().verify(proposals)
        return torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)


class _NoBonusToken(SpeculativeDecoding):
    """When every proposal is accepted, drops the target's extra token: k tokens a round instead of k + 1."""

    def accept(self, logits, q, proposals):
        emitted = super().accept(logits, q, proposals)
        full = proposals.shape[1] > 0 and emitted.shape[1] == proposals.shape[1] + 1
        return emitted[:, :-1] if full else emitted


class _DraftTokenOnMismatch(SpeculativeDecoding):
    """At the first mismatch, emits the draft's token instead of the target's (greedy)."""

    def accept(self, logits, q, proposals):
        emitted = super().accept(logits, q, proposals)
        a = emitted.shape[1] - 1
        if self.temperature == 0 and a < proposals.shape[1]:
            emitted = torch.cat([emitted[:, :a], proposals[:, a : a + 1]], dim=1)
        return emitted


class _ProposesPastTheEnd(SpeculativeDecoding):
    """Always proposes k tokens and trims the output: the last round feeds positions past max_len."""

    def propose(self, count):
        return super().propose(self.k)

    def run(self):
        return super().run()[:, : self.end]


class _OneTargetForwardPerToken(SpeculativeDecoding):
    """Verifies the proposals one target forward at a time (the cache makes it correct, and slow)."""

    def verify(self, proposals):
        rows = [super().verify(proposals[:, :0])]
        for i in range(proposals.shape[1]):
            rows.append(super().verify(proposals[:, i : i + 1])[:, -1:])
            self.target_seen = self.seq.shape[1] + i + 1
        return torch.cat(rows, dim=1)


for _cls, _name, _bug, _caught in [
    (_NoRollback, "no_cache_rollback", "the caches are not rolled back after a rejection", [GREEDY]),
    (_VerifiedByTheNextRow, "verified_by_the_next_row", "proposal j is checked against the target's row j + 1",
     [GREEDY]),
    (_NoBonusToken, "no_bonus_token", "no bonus token when every proposal is accepted", [FORWARDS]),
    (_DraftTokenOnMismatch, "draft_token_on_mismatch", "emits the draft's token at the first mismatch", [GREEDY]),
    (_ProposesPastTheEnd, "proposes_past_the_end", "the last round proposes k tokens, past the context length",
     [GREEDY]),
    (_OneTargetForwardPerToken, "one_target_forward_per_token", "verifies each proposal in its own target forward",
     [FORWARDS]),
]:
    mutant(name=f"speculative_generate_{_name}", bug=_bug, provides="speculative_generate", caught_by=_caught)(
        generate_with(_cls))
