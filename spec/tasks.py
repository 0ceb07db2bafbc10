"""Task losses: next-token prediction (language modelling), classification, regression.

Signatures (functions)
----------------------
    next_token_loss(logits, tokens, *, mask=None) -> scalar
    classification_loss(logits, labels) -> scalar
    regression_loss(predictions, targets) -> scalar

Shapes
------
    next_token_loss      logits (b, s, n) float, tokens (b, s) long, mask (b, s) bool (True = real token)
    classification_loss  logits (b, c) float, labels (b,) long in 0 .. c - 1
    regression_loss      predictions (b, c) float, targets (b, c) float
    out                  a 0-d tensor, the dtype and device of the logits / predictions

Math
----
    CE(z, y) = logsumexp_n(z) - z[y]                       (cross-entropy of logits z against label y)
    next_token_loss:  the logits at position t predict the token at position t + 1 (the pinned shift):
        targets T = {(i, t) : 0 <= t < s - 1 and mask[i, t + 1]}     (every (i, t < s - 1) without a mask)
        loss = (1 / |T|) * sum_{(i, t) in T} CE(logits[i, t], tokens[i, t + 1])
    i.e. ``cross_entropy(logits[:, :-1], tokens[:, 1:])`` averaged over real targets only.
    classification_loss = (1 / b) * sum_i CE(logits[i], labels[i])
    regression_loss     = (1 / (b c)) * sum_{i, j} (predictions[i, j] - targets[i, j])^2

Conventions (pinned, with the reason)
-------------------------------------
* The shift: position t of the model's output has seen tokens 0 .. t (it is causal), so it predicts
  token t + 1. logits[:, -1] predicts nothing here and tokens[:, 0] is never a target.
* Padding: a target counts iff the mask marks it real (mask[:, t + 1]); the mean is over real targets,
  not over all positions, so the loss of a sequence does not depend on how much padding follows it.
  Padded positions have no influence at all, even through their logits (exactly: weight 0, not 1e-30).
  The caller guarantees at least one real target (|T| >= 1).
* All three are means (PyTorch's reduction="mean"): comparable across batch sizes and lengths.
* Numerically stable: logsumexp subtracts the row maximum (logits of size 1e3 give finite losses).

Options (declarable; properties/options.py)
-------------------------------------------
    next_token_loss  mask   True | False: takes the padding ``mask`` (without it every target is real,
                            and the padding property is skipped)

Canonical parameters
--------------------
None.

Properties (properties/test_tasks.py)
-------------------------------------
each loss agrees with this reference and with F.cross_entropy / F.mse_loss; next_token_loss uses the
pinned shift (all mass on tokens[:, t + 1] at position t gives ~0; on tokens[:, t] it does not); padded
target positions change nothing (exact).
"""

from __future__ import annotations

import numpy as np

from spec.registry import Component, boolean, component


def _scalar(*args, **kwargs) -> tuple[int, ...]:
    return ()


NEXT_TOKEN_LOSS = component(Component(
    name="next_token_loss", kind="function", family="tasks",
    summary="mean cross-entropy of logits[:, :-1] predicting tokens[:, 1:], over real targets",
    output_shape=_scalar,
    options=(boolean("mask", "takes mask= (padding, True = real token)", argument="mask"),),
))
CLASSIFICATION_LOSS = component(Component(
    name="classification_loss", kind="function", family="tasks",
    summary="mean cross-entropy of (b, c) logits against (b,) labels", output_shape=_scalar,
))
REGRESSION_LOSS = component(Component(
    name="regression_loss", kind="function", family="tasks",
    summary="mean squared error over every entry of (b, c)", output_shape=_scalar,
))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """CE per row: logits (..., n), labels (...) -> (...), float64, max-subtracted logsumexp."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(z, np.asarray(labels)[..., None].astype(np.int64), axis=-1)[..., 0]
    return lse - picked


def next_token_loss(logits, tokens, *, mask=None) -> np.ndarray:
    """The float64 reference: mean CE of logits[:, t] against tokens[:, t + 1] over real targets."""
    tokens = np.asarray(tokens)
    per_target = cross_entropy(np.asarray(logits)[:, :-1], tokens[:, 1:])  # (b, s - 1)
    real = np.ones_like(per_target, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)[:, 1:]
    if not real.any():
        raise ValueError("next_token_loss needs at least one real target position")
    return np.asarray(per_target[real].mean())


def classification_loss(logits, labels) -> np.ndarray:
    return np.asarray(cross_entropy(logits, labels).mean())


def regression_loss(predictions, targets) -> np.ndarray:
    diff = np.asarray(predictions, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return np.asarray((diff**2).mean())
