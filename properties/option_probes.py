"""The ignored-option probe: an option the implementation accepts but does not act on.

A learner's module may take ``eps`` or ``causal`` and never use it (a hard-coded 1e-5, a causal mask
built regardless of the flag). Judged by the math properties, that shows up as a variance formula or a
head split that is "wrong" somewhere else. This probe names it instead: the first time a checked call
meets an option the implementation offers with several values, it runs the implementation with another
offered value on the same input and weights, and our implementation with both values. If ours changes its
output and theirs does not change a single bit, theirs ignores the option.

The probe costs four extra calls, once per (implementation, component, option) per process; an input on
which the option legitimately changes nothing (causal with one position, eps of a LayerNorm over one
feature) shows in our outputs too and is not conclusive, so the probe waits for a later call (a few tries
at most). Our own implementation is never probed, nor calls that carry a KV cache (stateful).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

TRIES = 4
_attempts: dict[tuple[str, str, str], int] = {}
# Verdicts are sticky: once an option is found ignored, every later call of that component says so, so that
# Hypothesis' replay of the failing example (when the probe itself no longer runs) fails the same way.
_verdicts: dict[tuple[str, str], str] = {}


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _detached(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    d = lambda a: a.detach() if isinstance(a, Tensor) else a
    return tuple(d(a) for a in args), {k: d(v) for k, v in kwargs.items()}


def _quiet(fn: Callable, *args, **kwargs) -> Tensor | None:
    try:
        with torch.no_grad():
            out = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 (the properties report errors; the probe only looks for silence)
        return None
    return out if isinstance(out, Tensor) else None


def ignored_option(checked: Any, args: tuple, kwargs: dict) -> str | None:
    """A sentence naming an option ``checked`` (a CheckedModule or CheckedFunction that was just called
    with ``args``/``kwargs``) accepts but ignores, or None."""
    label, offers, entry = checked.label, checked.offers, checked.entry
    if (label, entry.name) in _verdicts:
        return _verdicts[(label, entry.name)]
    impl = getattr(checked, "impl", None)
    if label == "ours" or impl is None or not impl.probe_options or "cache" in kwargs:
        return None
    from properties.attention_cases import OURS  # late: attention_cases imports this module's users

    args, kwargs = _detached(args, kwargs)
    if any(isinstance(v, torch.nn.Module) for v in getattr(checked, "config", {}).values()):
        return None  # built around another implementation object (their RotaryEmbedding): not rebuilt here
    for opt in entry.options:
        if opt.kind not in ("init", "call") or opt.name not in offers.values or offers.fixed(opt.name):
            continue
        key = (label, entry.name, opt.name)
        if _attempts.get(key, 0) >= TRIES:
            continue
        config = getattr(checked, "config", {})
        current = config.get(opt.name, offers.default(opt.name)) if opt.kind == "init" else \
            kwargs.get(opt.name, opt.default)
        other = next((v for v in offers.offered(opt.name) if not _same(v, current)), None)
        if other is None:
            continue
        pair = _outputs(checked, impl, OURS, opt, current, other, args, kwargs)
        if pair is None:
            _attempts[key] = TRIES  # cannot be probed (parameters differ between the values, or it raised)
            continue
        (theirs_a, theirs_b), (ours_a, ours_b) = pair
        if torch.equal(ours_a, ours_b):
            _attempts[key] = _attempts.get(key, 0) + 1  # this input cannot tell: try a later call
            continue
        _attempts[key] = TRIES
        if theirs_a.shape == theirs_b.shape and torch.equal(theirs_a, theirs_b):
            where = "constructed with" if opt.kind == "init" else "called with"
            _verdicts[(label, entry.name)] = (
                f"accepts {opt.name} but ignores it: {where} {opt.name}={current!r} and {opt.name}={other!r} it "
                f"returns bit-identical outputs on the same input, where the spec's outputs differ (largest "
                f"difference {float((ours_a - ours_b).abs().max()):.3g}). Use the argument (or, if it has "
                f"one {opt.name} built in, declare it: spec_options = {{{opt.name!r}: {current!r}}})."
            )
            return _verdicts[(label, entry.name)]
    return None


def _outputs(checked, impl, ours, opt, current, other, args, kwargs):
    """((theirs with current, theirs with other), (ours with current, ours with other)), or None."""
    name = checked.entry.name
    if opt.kind == "call":
        theirs_fn = checked.module if hasattr(checked, "module") else checked.fn
        if hasattr(checked, "module"):
            ok, params = _params(checked)
            if not ok:
                return None
            ours_fn = ours.build(name, seed=0, device=_device(args), dtype=_dtype(checked),
                                 params=params, **checked.config).module
        else:
            ours_fn = ours.raw(name)
        if ours_fn is None:
            return None
        outs = [_quiet(fn, *args, **{**kwargs, opt.name: value})
                for fn in (theirs_fn, ours_fn) for value in (current, other)]
    else:
        ok, params = _params(checked)
        if not ok:
            return None
        config = {**checked.config, opt.name: other}
        if params is not None and {k: v.shape for k, v in params.items()} != {
                k: p.shape for k, p in checked.entry.parameters(**_plain(config)).items()}:
            return None  # the other value has other parameters (swiglu vs relu): not comparable this way
        try:
            theirs_b = impl.build(name, seed=0, device=_device(args), dtype=_dtype(checked), params=params, **config)
            ours_a = ours.build(name, seed=0, device=_device(args), dtype=_dtype(checked), params=params,
                                **checked.config)
            ours_b = ours.build(name, seed=0, device=_device(args), dtype=_dtype(checked), params=params, **config)
        except Exception:  # noqa: BLE001
            return None
        outs = [_quiet(m.module, *args, **kwargs) for m in (checked, theirs_b, ours_a, ours_b)]
    if any(o is None for o in outs):
        return None
    return (outs[0], outs[1]), (outs[2], outs[3])


def _params(checked) -> tuple[bool, dict[str, Tensor] | None]:
    """(usable, canonical parameters to share, or None for a component without parameters)."""
    if not hasattr(checked, "module") or checked.entry.parameters is None:
        return True, None
    try:
        return True, {k: v.detach().clone() for k, v in checked.canonical_state().items()}
    except Exception:  # noqa: BLE001
        return False, None


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not isinstance(v, (torch.nn.Module, Tensor))}


def _device(args: tuple) -> torch.device:
    return next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))


def _dtype(checked) -> torch.dtype:
    p = next(iter(checked.module.parameters()), None) if hasattr(checked, "module") else None
    return p.dtype if p is not None else torch.float64
