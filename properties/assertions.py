"""Assertions and tolerance rules: one place, one message template.

Tolerance rules (the only ones the suite uses)
----------------------------------------------
* exact (``torch.equal``): where the math makes the result bit-identical: a masked key contributes
  exp(-inf) = 0 exactly, an unrelated batch element is never read, the Jacobian block of a causal
  map is structurally zero.
* float64 identities and float64 agreement with the reference: |actual - expected| <= 1e-9 * (1 + |expected|).
  Every computation here sums at most a few hundred terms of size ~1, whose float64 rounding error is
  ~1e-14; 1e-9 leaves five orders of margin for reordering while every real bug is off by > 1e-3.
* float64 output of a component that declares float32 compute (``{"compute_dtype": "float32"}``): the
  float32 rule of properties/precision.py, named in the report. Undeclared, a float64 failure at float32
  rounding level is examined there (is the input read at float32 precision?) and reported as such.
* float32, float16, bfloat16: the error-ratio rule (flash-attention's tests, pytorch's flex-attention
  tests). With ``expected`` the float64 reference and ``baseline`` a plain computation of the same math
  in the same dtype (our readable implementation),
      max|actual - expected| <= RATIO * max|baseline - expected| + FLOOR_ULPS * eps(dtype) * scale,
  scale = max(1, max|expected|). RATIO = 2 as flash-attention uses for forward passes; the floor of a few
  units in the last place keeps a lucky, nearly exact baseline from failing a correct implementation.
* counts of a random component (a sampler) over seeded draws: every count within Bernstein's deviation
  of trials * probability at a stated false-alarm rate, split over the cells by a union bound
  (``assert_frequencies_follow``); rigorous for every count, no normal approximation, and deterministic
  in CI because the seeds are.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from properties import precision

FLOAT64_RTOL = 1e-9
RATIO = 2.0
FLOOR_ULPS = 8.0


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x


def _locate(index: Sequence[int], axes: str | None) -> str:
    if axes:
        names = axes.split()
        if len(names) == len(index):
            return ", ".join(f"{n}={i}" for n, i in zip(names, index))
    return "index " + str(tuple(index))


def fail(claim: str, detail: str, hint: str | None = None) -> None:
    """Raise the suite's failure message: the claim, what was seen, and a hint for the learner."""
    __tracebackhide__ = True
    lines = [claim, f"  seen: {detail}"]
    if hint:
        lines.append(f"  hint: {hint}")
    raise AssertionError("\n".join(lines))


def _largest_error(actual: Tensor, expected: Tensor, axes: str | None) -> tuple[float, str]:
    if actual.numel() == 0:
        return 0.0, "(empty)"
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    flat = int(diff.argmax())
    index = np.unravel_index(flat, tuple(diff.shape)) if diff.dim() else ()
    where = _locate([int(i) for i in index], axes)
    got, want = actual.reshape(-1)[flat].item(), expected.reshape(-1)[flat].item()
    return diff.reshape(-1)[flat].item(), f"at {where} (expected {want:.6g}, got {got:.6g})"


def _check_shapes(actual: Tensor, expected: Tensor, claim: str) -> None:
    __tracebackhide__ = True
    if tuple(actual.shape) != tuple(expected.shape):
        fail(claim, f"shape {tuple(actual.shape)}, but should be {tuple(expected.shape)}")


def assert_equal(actual: Tensor, expected: Tensor, *, claim: str, hint: str | None = None, axes: str | None = None):
    """Bit-for-bit equality, for claims the math makes exact."""
    __tracebackhide__ = True
    actual, expected = _as_tensor(actual), _as_tensor(expected).to(actual.device)
    _check_shapes(actual, expected, claim)
    if torch.equal(actual, expected):
        return
    differ = int((actual != expected).sum())
    err, where = _largest_error(actual.double(), expected.double(), axes)
    fail(claim, f"{differ} of {actual.numel()} entries differ; the largest difference is {err:.3g} {where}", hint)


def assert_close(
    actual: Tensor,
    expected: Tensor | np.ndarray,
    *,
    claim: str,
    hint: str | None = None,
    axes: str | None = None,
    baseline: Tensor | None = None,
) -> None:
    """``actual`` equals ``expected`` (a float64 reference) within the rule for ``actual``'s dtype."""
    __tracebackhide__ = True
    expected = _as_tensor(expected).to(device=actual.device, dtype=torch.float64)
    _check_shapes(actual, expected, claim)
    # The rule follows the dtype the computation ran in (the baseline's, or float64 without one), so an
    # output silently returned in another dtype is reported, not judged by a looser rule.
    ran_in = torch.float64 if baseline is None else baseline.dtype
    if actual.dtype != ran_in:
        fail(claim, f"the output is {actual.dtype}, but the computation ran in {ran_in}", hint)
    a = actual.detach().double()
    err, where = _largest_error(a, expected, axes)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    declared = precision.declared_owner() if actual.dtype == torch.float64 else None
    if declared:
        allowed = precision.DECLARED_FLOAT32_ULPS * precision.FLOAT32_EPS * scale
        rule = (f"float32 rule, since {declared} declares compute_dtype=float32: "
                f"{precision.DECLARED_FLOAT32_ULPS:g} float32 ulp * {scale:.3g}")
    elif actual.dtype == torch.float64:
        allowed = FLOAT64_RTOL * scale
        rule = f"float64 rule 1e-9 * {scale:.3g}"
    else:
        if baseline is None:
            raise ValueError("the error-ratio rule needs a same-dtype baseline")
        base_err = (baseline.detach().double() - expected).abs().max().item() if expected.numel() else 0.0
        floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps * scale
        allowed = RATIO * base_err + floor
        rule = (
            f"error-ratio rule: {RATIO:g} x the plain {str(actual.dtype).removeprefix('torch.')} "
            f"computation's error {base_err:.3g} + {FLOOR_ULPS:g} ulp floor {floor:.3g}"
        )
    if not err <= allowed:  # also catches NaN
        outside = int(((a - expected).abs() > allowed).sum()) if err == err else actual.numel()
        if actual.dtype == torch.float64 and not declared:
            instead, note = precision.diagnosis(err, scale)
            hint = instead or (f"{hint} ({note})" if hint and note else hint or note)
        fail(
            claim,
            f"largest error {err:.3g} {where}; allowed {allowed:.3g} ({rule}); "
            f"{outside} of {actual.numel()} entries outside",
            hint,
        )


def float64_rtol() -> float:
    """The relative rounding slack of a float64 identity between outputs of the component under test:
    FLOAT64_RTOL, or the float32 rule's when the component called in this test declares float32 compute.
    Call it after the component (the declaration is recorded when it is called)."""
    if precision.declared_owner():
        return precision.DECLARED_FLOAT32_ULPS * precision.FLOAT32_EPS
    return FLOAT64_RTOL


def assert_true(condition: bool, *, claim: str, detail: str, hint: str | None = None) -> None:
    __tracebackhide__ = True
    if not condition:
        fail(claim, detail, hint)


# Every dtype an agreement property runs in: float64 (tight), float32 (every device), and the half
# precisions (CUDA only; conftest skips them on the CPU), the last three judged by the error-ratio rule.
PRECISIONS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# The statistical rule: for a random component (a sampler), counts over seeded draws against the probabilities
# the spec derives, with a stated false-alarm rate (derandomized seeds keep CI deterministic).


def bernstein_deviation(trials: int, probability: float, false_alarm: float) -> float:
    """t such that a Binomial(trials, probability) count strays from its mean by t or more with probability at
    most ``false_alarm``. Bernstein's inequality for a sum of variables in [0, 1] with variance sigma^2:
    P(|X - mu| >= t) <= 2 exp(-t^2 / (2 sigma^2 + 2t/3)); solving for equality with L = ln(2 / false_alarm):
    t = L/3 + sqrt(L^2/9 + 2 L sigma^2). Rigorous for every trials and probability (no normal approximation)."""
    log_term = math.log(2.0 / false_alarm)
    variance = trials * probability * (1.0 - probability)
    return log_term / 3.0 + math.sqrt(log_term**2 / 9.0 + 2.0 * log_term * variance)


def assert_frequencies_follow(counts: np.ndarray, probabilities: np.ndarray, trials: int, *, claim: str, what: str,
                              hint: str, false_alarm: float) -> None:
    """Every count lies within Bernstein's deviation of trials * probability (bernstein_deviation), with
    the false-alarm budget split evenly over the cells (a union bound). ``what`` names a cell: a format string
    that receives the cell's index."""
    __tracebackhide__ = True
    worst = None
    for index in np.ndindex(counts.shape):
        prob = float(probabilities[index])
        allowed = bernstein_deviation(trials, prob, false_alarm)
        gap = abs(float(counts[index]) - trials * prob)
        if gap > allowed and (worst is None or gap / allowed > worst[0]):
            worst = (gap / allowed, index, int(counts[index]), trials * prob, allowed)
    if worst is not None:
        _, index, count, expected, allowed = worst
        fail(claim, f"{what.format(*index)}: {count} of {trials}, expected {expected:.1f} +- {allowed:.1f} (Bernstein bound "
                    f"at false-alarm rate {false_alarm:.2g} per cell)", hint)
