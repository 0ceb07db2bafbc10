"""Direct preference optimization (Rafailov et al. 2023): sequence log-probabilities and the DPO loss.

Signatures (functions)
----------------------
    sequence_logprobs(logits, tokens, response_mask, *, average_log_prob=False) -> logps
    dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0)
        -> (loss, chosen_rewards, rejected_rewards)
The suite passes ``beta`` and ``label_smoothing`` by keyword.

Shapes (glossary of spec/__init__.py)
-------------------------------------
    logits          (b, s, n) float, a causal LM's output for tokens
    tokens          (b, s) long, prompt then response (then padding), ids in 0 .. n - 1
    response_mask   (b, s) bool, True = a response token whose log-probability counts
    logps           (b,), the dtype and device of the logits
    policy_chosen, policy_rejected, ref_chosen, ref_rejected    (b,) float: sequence log-probabilities
                    (sequence_logprobs of the chosen / rejected response under the policy / the reference)
    loss            a 0-d tensor;  chosen_rewards, rejected_rewards  (b,);  all in the inputs' dtype

Math
----
    sequence_logprobs: token t >= 1 is scored by the logits of position t - 1 (the pinned shift):
        lp[i, t] = log_softmax(logits[i, t - 1])[tokens[i, t]]               1 <= t <= s - 1
        R_i      = {t : 1 <= t <= s - 1 and response_mask[i, t]}             the counted tokens
        logps[i] = sum_{t in R_i} lp[i, t]                   (average_log_prob=True: divided by |R_i|)
    dpo_loss, with pc, pr, rc, rr the four inputs and eps = label_smoothing:
        h_i    = (pc_i - rc_i) - (pr_i - rr_i)                  the margin of the implicit rewards / beta
        loss   = (1/b) sum_i [ -(1 - eps) log sigmoid(beta h_i) - eps log sigmoid(-beta h_i) ]
        chosen_rewards = beta (pc - rc),  rejected_rewards = beta (pr - rr)    (detached)
        d loss / d pc_i = -(beta / b) [ (1 - eps) sigmoid(-beta h_i) - eps sigmoid(beta h_i) ] = -d loss / d pr_i
        d loss / d rc_i = d loss / d rr_i = 0
    With eps = 0 the gradient raises the chosen and lowers the rejected log-probability with weight
    beta sigmoid(-beta h): most where the implicit reward ranks the pair wrongly. Since
    log sigmoid(x) - log sigmoid(-x) = x, L(h) - L(-h) = -(1 - 2 eps) beta h for each pair, and at policy =
    reference (h = 0) the loss is log 2 for every beta and eps.

Conventions (pinned, with the reason)
-------------------------------------
* The shift: a causal LM's logits at position t have seen tokens 0 .. t and predict token t + 1 (as
  spec/tasks.py's next_token_loss). TRL's get_batch_logps: ``labels[:, 1:]`` against ``logits[:, :-1]``.
* response_mask is over tokens, not over logits: it marks which tokens' log-probabilities count. The
  prompt and the padding (left or right) are False; their content, and the logits that score them,
  change nothing (bit for bit: excluded terms get weight exactly 0). Token 0 has no logits before it, so
  it cannot be scored: response_mask[:, 0] is ignored (never read), as TRL drops it with ``labels[:, 1:]``.
  A response always follows at least one prompt token (a BOS, at least).
* The sum by default: DPO's log pi(y | x) is the log-probability of the whole response. The mean per
  token (``average_log_prob=True``, TRL's old option, IPO- and SimPO-style length normalisation) is
  declared; with it the caller guarantees at least one counted token per row.
* log_softmax in the logits' dtype with the row maximum subtracted; the output has the logits' dtype.
* The argument order is TRL's: policy chosen, policy rejected, reference chosen, reference rejected.
* The reference receives no gradient: dpo_loss detaches ref_chosen and ref_rejected itself. TRL computes
  them under no_grad, but a plug-in loss must be safe when a learner runs the frozen model with autograd
  on (its parameters would otherwise get gradients, and an optimizer holding them would move the
  reference).
* The rewards are detached (TRL: logging quantities that must not keep the graph alive).
* The loss is the mean over the batch (TRL's ``losses.mean()``), so its size does not depend on b.
* Conservative DPO (Mitchell 2023, TRL's label_smoothing): eps is the probability that a label is
  flipped, so the loss interpolates the two directions, L_eps(h) = (1 - eps) L_0(h) + eps L_0(-h);
  0 <= eps <= 0.5 (TRL's range).
* log sigmoid is computed stably (``F.logsigmoid``, -softplus(-x)): finite for every finite margin; a
  sequence log-probability of -1000 is ordinary, and log(sigmoid(x)) is -inf below x = -745 (float64).
* beta > 0; the inputs are four (b,) tensors of one dtype and device.

Options (declarable; properties/options.py)
-------------------------------------------
    sequence_logprobs  average_log_prob   False | True: the call takes ``average_log_prob``
    dpo_loss           label_smoothing    0.0 (default), any value in [0, 0.5] declarable; the properties
                                          draw 0.0, 0.1 and 0.3. Without the keyword: 0.0 only, and the
                                          conservative-DPO property is skipped
    dpo_loss           rewards            True: returns (loss, chosen_rewards, rejected_rewards) (a
                                          convention, never passed); a loss returning the loss alone
                                          declares False and the reward checks are skipped

Canonical parameters
--------------------
None: these are functions.

Properties (properties/test_preference_optimization.py)
------------------------------------------------------
sequence_logprobs agrees with this reference (sum and mean), uses the pinned shift, and ignores prompt and
padding tokens (their content and the logits scoring them) and response_mask[:, 0]. dpo_loss agrees with
this reference (loss and rewards, finite at margins of thousands); is log 2 when the policy equals the
reference; depends on the margin h alone; L(h) - L(-h) = -(1 - 2 eps) beta h; swapping chosen and rejected
maps h to -h and swaps the rewards; its gradient raises the chosen and lowers the rejected log-probability
with weight beta sigmoid(-beta h); the reference gets no gradient and the rewards carry none; conservative
DPO interpolates the two directions. Learnability: a tiny DecoderOnlyLM trained with DPO against its
frozen copy learns a toy preference (held-out preference accuracy >= 90%, the reward margin grows).
"""

from __future__ import annotations

import numpy as np

from spec.registry import Component, Option, component
from spec.tasks import cross_entropy


def _is_smoothing(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 0.5


AVERAGE_LOG_PROB = Option("average_log_prob", (False, True), "call",
                          "False: the sum of the response tokens' log-probabilities; True: their mean per token")
LABEL_SMOOTHING = Option("label_smoothing", (0.0, 0.1, 0.3), "call",
                         "conservative DPO: the probability eps in [0, 0.5] that a preference label is flipped",
                         accepts=_is_smoothing)
REWARDS = Option("rewards", (True, False), "convention",
                 "returns (loss, chosen_rewards, rejected_rewards); False: the loss alone")

SEQUENCE_LOGPROBS = component(Component(
    name="sequence_logprobs", kind="function", family="preference_optimization",
    summary="summed log-probability of the response tokens, logits[:, t] scoring tokens[:, t + 1]",
    output_shape=lambda logits, *args, **kwargs: (logits.shape[0],),
    options=(AVERAGE_LOG_PROB,),
))
DPO_LOSS = component(Component(
    name="dpo_loss", kind="function", family="preference_optimization",
    summary="mean of -log sigmoid(beta h) (conservative with label_smoothing) and the implicit rewards",
    output_shape=None,  # a tuple (loss, chosen_rewards, rejected_rewards): the properties check it
    options=(LABEL_SMOOTHING, REWARDS),
))


def sequence_logprobs(logits, tokens, response_mask, *, average_log_prob: bool = False) -> np.ndarray:
    """The float64 reference: (b, s, n), (b, s), (b, s) -> (b,)."""
    tokens = np.asarray(tokens)
    scored = -cross_entropy(np.asarray(logits, dtype=np.float64)[:, :-1], tokens[:, 1:])  # (b, s - 1): token t + 1
    counted = np.asarray(response_mask, dtype=bool)[:, 1:]  # token 0 cannot be scored
    total = np.where(counted, scored, 0.0).sum(axis=-1)
    if not average_log_prob:
        return total
    count = counted.sum(axis=-1)
    if (count == 0).any():
        raise ValueError("average_log_prob needs at least one counted response token per row")
    return total / count


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log(1 / (1 + e^-x)) = -log(1 + e^-x), finite for every finite x."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(log_sigmoid(x))


def margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> np.ndarray:
    """h = (pc - rc) - (pr - rr), (b,)."""
    pc, pr, rc, rr = (np.asarray(a, dtype=np.float64)
                      for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return (pc - rc) - (pr - rr)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float64 reference: (loss (), chosen_rewards (b,), rejected_rewards (b,))."""
    h = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    losses = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    chosen = beta * (np.asarray(policy_chosen, dtype=np.float64) - np.asarray(ref_chosen, dtype=np.float64))
    rejected = beta * (np.asarray(policy_rejected, dtype=np.float64) - np.asarray(ref_rejected, dtype=np.float64))
    return np.asarray(losses.mean()), chosen, rejected


def dpo_loss_gradient(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                      label_smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(d loss / d policy_chosen, d loss / d policy_rejected), each (b,); the reference gets none."""
    h = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    d_h = -(beta / h.size) * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h))
    return d_h, -d_h
