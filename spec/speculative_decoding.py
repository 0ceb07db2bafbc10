"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap draft model proposes k tokens, the
target model scores them all in one forward pass, and an accept/reject rule keeps a prefix of them and adds
one token of its own, so that the output is distributed exactly as the target's own decoding.

Signatures
----------
    speculative_accept(p, q, draft_tokens, *, generator=None) -> tokens
    residual_distribution(p, q) -> r
    speculative_generate(target, draft, prompt, *, max_new_tokens, k, temperature=0.0, generator=None) -> tokens

Shapes (glossary of spec/__init__.py, plus this family's kd)
------------------------------------------------------------
    kd  draft tokens per round (the call's ``k``; Leviathan et al.'s gamma). The glossary's k (experts per
        token) is another family's letter, hence kd ("k, draft").
    speculative_accept   p (b, kd + 1, n): the target's next-token probabilities after the prefix and after
                         each of the kd draft tokens; q (b, kd, n): the draft's probabilities the draft tokens
                         were drawn from; draft_tokens (b, kd) long
                         -> tokens (b, kd + 1) long: row i holds its a_i accepted draft tokens, then one more
                         token, then -1 padding (vLLM's rejection sampler returns this layout)
    residual_distribution  p, q (..., n) -> r (..., n), the dtype and device of p
    speculative_generate prompt (1, s0) long -> (1, s0 + max_new_tokens) long, the prompt first. Batch 1 only:
                         rows of a batch accept different numbers of tokens, and a KVCache has one length for
                         all rows (the suite calls it with b = 1; b > 1 is outside the spec).

Math
----
The accept/reject rule, for one draft token x drawn from q with target probabilities p:
    accept x with probability min(1, p(x) / q(x))             (u < p(x) / q(x) for u ~ U[0, 1))
    on rejection, emit a token drawn from  r = norm(max(0, p - q))      (residual_distribution)
The emitted token is distributed exactly as p:
    P(emit y) = q(y) min(1, p(y)/q(y)) + (1 - sum_z min(p(z), q(z))) r(y)
              = min(p(y), q(y)) + max(0, p(y) - q(y))  = p(y),
since sum_z max(0, p(z) - q(z)) = 1 - sum_z min(p(z), q(z)) is r's normalizer. The probability of accepting
is sum_z min(p(z), q(z)) (1 when q = p). speculative_accept applies the rule to draft positions 0, 1, ...
and stops at the first rejection j (emitting the residual sample of row j); when all kd are accepted it
emits a bonus token drawn from p[:, kd] (the target's distribution after the last draft token, which the
verifying pass computed anyway). Each row so emits between 1 and kd + 1 tokens, and conditional on a row
reaching position j, the token it emits there is distributed as p[:, j].

speculative_generate, one round (k' = min(k, tokens still to emit - 1) proposals):
    the draft proposes x_1 .. x_k' one at a time (greedy: argmax; sampling: drawn from q = softmax(logits / T))
    the target runs ONE forward pass over the tokens it has not seen plus x_1 .. x_k' and reads p for each
    greedy: accept while argmax p_j == x_j; then emit argmax p_j at the first mismatch, or argmax p_k' (bonus)
    sampling: speculative_accept(p, q, x) with p = softmax(target logits / T)
Greedy decoding is the deterministic limit of the rule (p and q one-hot), so it returns exactly the target's
greedy tokens, whatever the draft, k or prompt. A draft equal to the target has every proposal accepted, so
each round emits k + 1 tokens (fewer in the last) and the target runs ceil(max_new_tokens / (k + 1)) times.

Conventions (pinned, with the reason)
-------------------------------------
* Strict test: accept iff u < p(x) / q(x), u ~ U[0, 1). A token with p(x) = 0 is then never accepted (with
  u <= p/q, u = 0 would accept it), and p = q accepts always (the ratio is exactly 1).
* When p == q the residual max(0, p - q) is all zero and rejection has probability 0; residual_distribution
  then returns p (any finite distribution would do; 0/0 would not), never NaN.
* Output layout (b, kd + 1) with -1 after the emitted tokens: fixed-shape, batchable, the layout of vLLM.
* The prompt's prefill is the target's first verifying pass (prompt + first proposals in one forward), so a
  round costs one target forward, the first included. A round proposes k' = min(k, still to emit - 1)
  tokens, so no model is fed past position s0 + max_new_tokens - 2, as in plain generation: models with
  max_len = s0 + max_new_tokens suffice.
* Cache rollback: ours keeps one KVCache list per model and, after a round, sets every layer's
  ``KVCache.length`` back to the positions still valid (the prefix plus the accepted proposals); the
  entries past it are overwritten by the next update. The target then feeds the emitted correction or bonus
  token first in the next round. Without a rollback the rejected proposals stay in the target's context and
  the greedy tokens diverge.
* Models: any two modules with DecoderOnlyLM's call contract (``model(tokens, cache=...)`` -> logits (b, s, n)
  and ``new_cache(batch_size=, capacity=)``), sharing the vocabulary; the draft may be any size.

Options (declarable; properties/options.py)
-------------------------------------------
    generator  (speculative_accept; input): the call takes generator= (a torch.Generator); False: it draws
               from the global RNG (the suite then seeds that).
    sampling   (speculative_generate; input): the call takes temperature= and generator= (speculative
               sampling); False: greedy only.

Canonical parameters
--------------------
None (the models carry their own).

Properties (properties/test_speculative_decoding.py)
----------------------------------------------------
residual_distribution makes the rule exact: min(p, q) + (1 - sum min(p, q)) r equals p (float64), and r is a
distribution, for p, q with zeros either way and p == q; speculative_accept emits, at every position a row
reaches, a token distributed as p there, and accepts with probability sum min(p, q) (a statistical check on
seeded samples, false-alarm rate at most 1e-6 per example by Bernstein's inequality), and never emits a token
the target rules out; a draft equal to the target is accepted in full, with a bonus token; greedy
speculative_generate returns exactly the target's greedy tokens for any draft (another model, a smaller one,
the target itself), any k in 1 .. 5 and any prompt length, and so does sampling at a vanishing temperature;
a draft equal to the target needs ceil(max_new_tokens / (k + 1)) target forwards.
"""

from __future__ import annotations

import math

import numpy as np

from spec.registry import Component, boolean, component, same_shape_as_first_input

SPECULATIVE_ACCEPT = component(Component(
    name="speculative_accept", kind="function", family="speculative_decoding",
    summary="the accept/reject kernel: accept draft x with probability min(1, p/q), else sample the residual",
    output_shape=lambda p, q, draft_tokens, **_: (draft_tokens.shape[0], draft_tokens.shape[1] + 1),
    options=(boolean("generator", "the call takes generator= (a torch.Generator); False: the global RNG",
                     argument="generator"),),
))

RESIDUAL_DISTRIBUTION = component(Component(
    name="residual_distribution", kind="function", family="speculative_decoding",
    summary="norm(max(0, p - q)), the distribution a rejected draft token is replaced from (p when p == q)",
    output_shape=same_shape_as_first_input,
))

SPECULATIVE_GENERATE = component(Component(
    name="speculative_generate", kind="function", family="speculative_decoding",
    summary="draft proposes k tokens, the target verifies them in one forward pass (greedy or sampling)",
    output_shape=lambda target, draft, prompt, *, max_new_tokens, **_: (prompt.shape[0],
                                                                        prompt.shape[1] + max_new_tokens),
    options=(boolean("sampling", "the call takes temperature= and generator= (speculative sampling); False: greedy "
                     "only", argument="temperature"),),
))


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)) along the last axis; p itself where p == q (the residual is then never sampled)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    excess = np.maximum(p - q, 0.0)
    total = excess.sum(axis=-1, keepdims=True)
    return np.where(total > 0, excess / np.where(total > 0, total, 1.0), p)


def acceptance_probability(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x)): how often a draft token drawn from q is kept."""
    return np.minimum(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)).sum(axis=-1)


def emitted_distribution(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The distribution of the token the rule emits, given the residual r it falls back to:
    q(y) min(1, p(y)/q(y)) + (1 - acceptance) r(y), written as min(p, q) (equal where q > 0, and both 0 where
    q = 0). With r = residual_distribution(p, q) it is p."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return np.minimum(p, q) + (1.0 - acceptance_probability(p, q))[..., None] * np.asarray(r, dtype=np.float64)


def target_forwards_when_all_accepted(max_new_tokens: int, k: int) -> int:
    """Rounds (one target forward each) when every proposal is accepted: k + 1 tokens a round, fewer in the last."""
    return math.ceil(max_new_tokens / (k + 1))


