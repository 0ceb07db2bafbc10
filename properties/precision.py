"""Compute precision: components that work in float32 whatever their input.

Many libraries compute norms, RoPE tables or softmax in float32 on purpose (``x.float()`` ... ``.to(dtype)``,
a float32 ``inv_freq`` buffer). Given float64 input such a component returns float64 with float32-level
error, which the float64 rule (1e-9) rejects. Two cases:

* **declared** (``spec_options = {"compute_dtype": "float32"}``): its float64 checks are judged by the
  float32 rule (assertions.assert_close), and the report says so;
* **undeclared**: a float64 failure whose error is at float32 rounding level is examined once more: the
  last float64 call is re-run with its inputs rounded to float32. If the output does not change at all,
  the component reads its input at float32 precision only, and the report says that, not a math hint.
  Otherwise a note names a float32 constant or table as a possible cause next to the math hint.

The checked calls record what this needs (properties/plugin.py); nothing here runs unless a check fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

# The float32 rule where no float32 baseline is at hand: |error| <= DECLARED_FLOAT32_ULPS * eps32 * scale.
# Why 96: our float32 implementations, run against the float64 references on every float32 agreement
# property of the thorough profile (400 examples each, 10,800 comparisons), stay within 38.1 float32 ulp
# of the output scale (the worst: LayerNorm over d = 2 features, where x - mean cancels; encoder-decoder
# models follow at 16). The error-ratio rule on that worst case allows 2 x 38.1 + 8 = 84.2 ulp; 96 rounds
# it up. A float64-computing bug (a misplaced eps, a wrong scale) is not hidden by it: those are judged
# by the float64 rule unless the implementation itself declares float32 compute.
DECLARED_FLOAT32_ULPS = 96.0
FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass
class _State:
    declared: str | None = None  # the owner that declared float32 compute, in this test
    last_call: tuple[Callable, tuple, dict] | None = None


STATE = _State()


def reset() -> None:
    """Forget what the previous test recorded (called before each test)."""
    STATE.declared = None
    STATE.last_call = None


def record(offers: Any, fn: Callable, args: tuple, kwargs: dict, label: str) -> None:
    """Called by the checked call wrappers before each call into an implementation. Calls of our own
    implementation (the baselines properties compute next to theirs) are not the ones to diagnose."""
    if label == "ours":
        return
    if offers is not None and offers.compute_dtype == torch.float32:
        STATE.declared = offers.owner
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if any(t.dtype == torch.float64 for t in tensors) and "cache" not in kwargs:
        STATE.last_call = (fn, args, kwargs)


def declared_owner() -> str | None:
    return STATE.declared


def float32_level(err: float, scale: float) -> bool:
    """Whether an error is within what float32 arithmetic explains (the declared rule's bound)."""
    return err <= DECLARED_FLOAT32_ULPS * FLOAT32_EPS * scale


def reads_input_in_float32() -> bool | None:
    """Re-run the last float64 call with its float64 inputs rounded to float32 (still float64 tensors).
    True: the output is bit-identical, so the component only sees its input at float32 precision;
    False: it does not; None: nothing to probe (no recorded call, or it failed again)."""
    if STATE.last_call is None:
        return None
    fn, args, kwargs = STATE.last_call
    rounded = lambda a: a.detach().float().double() if isinstance(a, Tensor) and a.dtype == torch.float64 else a
    if not any(isinstance(a, Tensor) and a.dtype == torch.float64 and not torch.equal(a, rounded(a))
               for a in (*args, *kwargs.values())):
        return None  # the inputs were float32-representable already: the probe cannot tell
    try:
        with torch.no_grad():
            plain = fn(*(a.detach() if isinstance(a, Tensor) else a for a in args),
                       **{k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()})
            again = fn(*(rounded(a) for a in args), **{k: rounded(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 (a probe must never raise into the report)
        return None
    if not (isinstance(plain, Tensor) and isinstance(again, Tensor)) or plain.shape != again.shape:
        return None
    return bool(torch.equal(plain, again))


def diagnosis(err: float, scale: float) -> tuple[str | None, str | None]:
    """For a float64 failure of ``err``: (a replacement hint, or None) and (a note to add, or None)."""
    if not float32_level(err, scale):
        return None, None
    ulps = err / (FLOAT32_EPS * scale)
    if reads_input_in_float32():
        return (
            f"the component computes in float32 for float64 input: its output does not change when the input "
            f"is rounded to float32, and its error ({ulps:.1f} float32 ulp) is float32 rounding, not math. Keep "
            "the input's dtype (no .float(), no float32 constants or tables), or, if float32 compute is "
            "deliberate, declare it: spec_options = {'compute_dtype': 'float32'} (README, 'Declaring what "
            "you offer').",
            None,
        )
    return None, (
        f"note: this error is only {ulps:.1f} float32 ulp of the output scale; if the math is right, a float32 "
        "constant, table or buffer inside the component (cos/sin tables, inv_freq, a float32 eps tensor) "
        "would explain it: build them in the input's dtype, or declare {'compute_dtype': 'float32'}."
    )
