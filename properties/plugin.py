"""How the suite reaches an implementation: a Python module, looked up by the spec's component names.

An *implementation* is any module (a file path or an importable name) that defines some of the spec's
components under their names (``MultiHeadAttention``, ``scaled_dot_product_attention``, ...). The suite
never replaces a missing component with ours: the properties that need it are skipped with
"<name> is not provided by <module>".

Every call into the implementation goes through :class:`CheckedModule` or :class:`CheckedFunction`, which
turn the ways learner code goes wrong (an exception, a tuple instead of a tensor, a wrong shape, NaN) into
one :class:`ComponentFailure` with a plain sentence, so Hypothesis shrinks it like any other failure.

Canonical parameters
--------------------
Relational properties share weights between modules (MHA with one head vs SelfAttention, GQA vs MHA with
repeated K/V heads, ...). They do it through the canonical names each spec entry lists (``q.weight``,
``o.bias``, ...). A module whose parameters carry other names declares, on its class, either

* ``canonical_names = {"q.weight": "q_proj.weight", ...}``: canonical name -> your parameter name; or
* ``canonical_state_dict(self) -> dict[str, Tensor]`` and ``load_canonical_state_dict(self, params)``
  for layouts a rename cannot express (a fused QKV projection); see examples/fused_qkv_attention.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from properties import call_probes
from properties.call_probes import RUN, CallTimeout
from properties import precision
from properties.option_probes import ignored_option
from properties.options import DeclarationError, Offers, drawn_value, full_offers, read_declaration
from spec import COMPONENTS, Component, Param

# The two implementations that ship with the project, selectable by these names.
BUILTIN_TARGETS = {"ours": "implementations", "pytorch": "adapters.pytorch"}
DEFAULT_TARGETS = ("ours", "pytorch")


class ImplementationLoadError(Exception):
    """The implementation module could not be found or imported (a usage error, reported once)."""


class ComponentFailure(AssertionError):
    """A component misbehaved in a way the property did not get to judge: it raised, returned the wrong
    type or shape, produced NaN, or its parameters do not match the spec. Reported as a property failure."""


def where_raised(exc: BaseException, callee: Any = None) -> str:
    """' (at model.py:12 in forward)': the innermost line of the implementation's own files, not the
    suite's wrapper or torch's internals; for an error of the call itself (an unexpected keyword argument)
    the definition of what was called, e.g. its ``__init__`` (properties/call_probes.location)."""
    where = call_probes.location(exc, callee)
    return f" ({where})" if where else ""


def describe_call(name: str, config: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"{name}({args})"


class Implementation:
    """A module of components under test, with the name it is reported by.

    Components are looked up by their spec names: ``SPEC_COMPONENTS`` (a module-level dict, spec name ->
    object, or None to exclude a same-named object that is not the spec's) comes first; then, if the
    module defines ``__all__``, only the names it lists; otherwise any attribute of that name.
    """

    def __init__(self, label: str, namespace: ModuleType | Any, *, fallback: Implementation | None = None,
                 probe_options: bool = True):
        self.label = label
        self.namespace = namespace
        # Only the suite's own mutant tests use a fallback (a mutant replaces one component of ours).
        self.fallback = fallback
        # The ignored-option probe (properties/option_probes.py). The mutant catalog turns it off: there a
        # property must catch its mutant by its own claim, not by the probe's sentence.
        self.probe_options = probe_options
        self._offers: dict[str, Offers] = {}

    def __repr__(self) -> str:
        return self.label

    def _own(self, name: str) -> Any:
        """The namespace's object for spec name ``name``, or MISSING."""
        mapping = getattr(self.namespace, NAME_MAPPING, None) or {}
        if name in mapping:
            return MISSING if mapping[name] is None else mapping[name]
        exported = getattr(self.namespace, "__all__", None)
        if exported is not None and name not in exported:
            return MISSING
        return getattr(self.namespace, name, MISSING)

    def provides(self, name: str) -> bool:
        return self._own(name) is not MISSING or (self.fallback is not None and self.fallback.provides(name))

    def provided(self) -> list[str]:
        return [name for name in COMPONENTS if self.provides(name)]

    def missing_reason(self, name: str) -> str:
        return f"{name} is not provided by {self.label}"

    def raw(self, name: str) -> Any:
        obj = self._own(name)
        if obj is not MISSING:
            return obj
        if self.fallback is not None:
            return self.fallback.raw(name)
        # Normally conftest skips such a property at collection (from its `component` parameter and
        # `requires` marker); this is the safety net for a property that reaches a component undeclared.
        pytest.skip(self.missing_reason(name))

    def owner(self, name: str) -> str:
        """How reports name the object standing for ``name``: "MyAttention (as MultiHeadAttention)"."""
        obj = self.raw(name)
        own = getattr(obj, "__name__", type(obj).__name__)
        return own if own == name else f"{own} (as {name})"

    def offers(self, name: str) -> Offers:
        """The option space this implementation's ``name`` offers (its ``spec_options``, validated)."""
        if name not in self._offers:
            self._offers[name] = read_declaration(name, self.raw(name), self.owner(name))
        return self._offers[name]

    def validate(self) -> None:
        """Read every declaration once, so a wrong one is a usage error before any property runs."""
        for name in self.provided():
            try:
                self.offers(name)
            except DeclarationError as exc:
                raise ImplementationLoadError(f"--impl {self.label}: {exc}") from None
        mapping = getattr(self.namespace, NAME_MAPPING, None)
        if mapping is not None:
            unknown = sorted(set(mapping) - set(COMPONENTS))
            if not isinstance(mapping, dict) or unknown:
                raise ImplementationLoadError(
                    f"--impl {self.label}: {NAME_MAPPING} must map spec names to objects (or None); "
                    f"{unknown} are not spec components. The spec's names are: {', '.join(COMPONENTS)}."
                )

    def function(self, name: str) -> CheckedFunction:
        checked = CheckedFunction(COMPONENTS[name], self.raw(name), self.label, self.offers(name))
        checked.impl = self  # the ignored-option probe calls it again (properties/option_probes.py)
        return checked

    def build(
        self,
        name: str,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        params: dict[str, Tensor] | None = None,
        **config: Any,
    ) -> CheckedModule:
        """Construct ``name(**config)`` reproducibly, move it to device/dtype and load canonical parameters.

        Options follow properties/options.py: every constructor option the implementation offers with
        several values is passed (the spec default where ``config`` does not say); a single offered value
        is never passed. The canonical parameters are drawn from ``seed`` (see spec.registry.Param) unless
        ``params`` are given, so every implementation is judged on the same weights.
        """
        entry = COMPONENTS[name]
        cls = self.raw(name)
        offers = self.offers(name)
        config = {**constructor_defaults(offers), **config}
        kwargs = constructor_arguments(offers, config)
        call = describe_call(name, kwargs)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also queue seeds for every lazy device
            # backend (CUDA, XPU, MTIA), formatting a stack trace each time; modules are built on the CPU.
            torch.default_generator.manual_seed(seed)
            try:
                module = cls(**kwargs)
            except Exception as exc:
                raise ComponentFailure(
                    f"{self.label}: constructing {call} raised {type(exc).__name__}: {exc}{where_raised(exc)}. "
                    + constructor_hint(offers, exc)
                ) from None
        if not isinstance(module, nn.Module):
            raise ComponentFailure(f"{self.label}: {call} is a {type(module).__name__}, not a torch.nn.Module")
        module = module.to(device=device, dtype=dtype).eval()
        checked = CheckedModule(entry, module, self.label, config, offers)
        checked.impl = self  # the ignored-option probe rebuilds it with another value (properties/option_probes.py)
        if entry.parameters is not None:
            if params is None:
                params = draw_parameters(entry.parameters(**parameter_config(config)), seed)
            checked.load_canonical(params)
        return checked


MISSING = object()
NAME_MAPPING = "SPEC_COMPONENTS"


def constructor_defaults(offers: Offers) -> dict[str, Any]:
    """The value of every constructor option a property does not set: the spec default where offered,
    else the implementation's own (so canonical parameters and references follow a bias-free or
    fixed-eps implementation)."""
    return {opt.name: offers.default(opt.name) for opt in offers.entry.options if opt.kind == "init"}


def constructor_arguments(offers: Offers, config: dict[str, Any]) -> dict[str, Any]:
    """The keywords actually passed: options with one offered value are built in, never passed; an
    "input" option's keyword (``rotary``) only when present."""
    kinds = {opt.name: opt for opt in offers.entry.options}
    kwargs = {}
    for key, value in config.items():
        opt = kinds.get(key)
        if opt is not None and opt.kind == "init":
            drawn_value(offers, key, value)
            if offers.fixed(key):
                continue
        kwargs[key] = value
    return kwargs


def parameter_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration canonical parameters depend on (objects such as ``rotary`` left out)."""
    return {k: v for k, v in config.items() if not isinstance(v, (nn.Module, Tensor))}


def constructor_hint(offers: Offers, exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, TypeError) and "unexpected keyword argument" in text:
        for opt in offers.entry.options:
            if f"'{opt.name}'" in text:
                return (f"If {offers.owner} has no {opt.name!r} option, declare the value it has built in, "
                        f"e.g. spec_options = {{{opt.name!r}: {opt.default!r}}} (README, 'Declaring what you offer').")
    return "The suite builds every component with the spec's keyword arguments."


class CheckedFunction:
    """Calls a spec'd function and turns misbehaviour into a ComponentFailure."""

    def __init__(self, entry: Component, fn: Callable, label: str, offers: Offers | None = None):
        self.entry, self.fn, self.label = entry, fn, label
        self.offers = offers or full_offers(entry.name)

    def __call__(self, *args: Tensor, **kwargs: Any) -> Tensor:
        __tracebackhide__ = True
        kwargs = call_arguments(self.offers, kwargs)
        precision.record(self.offers, self.fn, args, kwargs, self.label)
        probe, self._probed = not getattr(self, "_probed", False), True  # the repeat probes: first call only
        out = checked_call(self.entry, self.fn, self.label, self.entry.name, args, kwargs, probe=probe)
        ignored = ignored_option(self, args, kwargs)
        if ignored:
            raise ComponentFailure(f"{self.label}: {self.entry.name} {ignored}")
        return out


class CheckedModule:
    """A built module under test: call it like the module; reach the module itself as ``.module``."""

    def __init__(self, entry: Component, module: nn.Module, label: str, config: dict[str, Any],
                 offers: Offers | None = None):
        self.entry, self.module, self.label, self.config = entry, module, label, config
        self.offers = offers or full_offers(entry.name)
        self.call = describe_call(entry.name, config)

    def __repr__(self) -> str:
        return f"{self.label}: {self.call}"

    def __call__(self, *args: Tensor, **kwargs: Any) -> Tensor:
        __tracebackhide__ = True
        kwargs = call_arguments(self.offers, kwargs)
        precision.record(self.offers, self.module, args, kwargs, self.label)
        probe, self._probed = not getattr(self, "_probed", False), True  # the repeat probes: first call only
        out = checked_call(self.entry, self.module, self.label, self.call, args, kwargs, probe=probe)
        ignored = ignored_option(self, args, kwargs)
        if ignored:
            raise ComponentFailure(f"{self.label}: {self.call} {ignored}")
        return out

    def method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call another method of the module (``generate``, ``encode``, ``new_cache``, ...), reporting a
        missing method, an exception, an input modified in place, a call that does not return or a
        non-finite tensor result as the component's failure."""
        __tracebackhide__ = True
        fn = getattr(self.module, name, None)
        if fn is None:
            raise ComponentFailure(f"{self}: has no method {name!r}, which the spec's {self.entry.name} defines")
        known = call_probes.DEFECTS.get((self.label, self.entry.name))
        if known:
            _defect(self.label, self.entry.name, self.call, known)
        before = call_probes.snapshot(args, kwargs)
        out = invoke(self.entry, fn, self.label, f"{self.call}.{name}", args, kwargs)
        changed = call_probes.modified_inputs(fn, before)
        if changed:
            raise ComponentFailure(f"{self.label}: {self.call}.{name} {changed}")
        if isinstance(out, Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            raise ComponentFailure(f"{self}: .{name} returned non-finite values")
        return out

    def expected_parameters(self) -> dict[str, Param]:
        assert self.entry.parameters is not None, f"{self.entry.name} has no canonical parameters"
        return self.entry.parameters(**self.config)

    def canonical_state(self) -> dict[str, Tensor]:
        """The module's parameters under the spec's canonical names (live tensors or views, not copies)."""
        expected = self.expected_parameters()
        try:
            lookups: dict = {}
            state = {name: canonical_tensor(self.module, name, lookups) for name in expected}
        except KeyError as exc:
            own = sorted(dict(self.module.named_parameters()))
            raise ComponentFailure(
                f"{self}: {exc.args[0]}; its parameters are {own}. Name them as the spec does, or map them "
                "with `canonical_names` (README, 'Check your own implementation')."
            ) from None
        for name, param in expected.items():
            if tuple(state[name].shape) != param.shape:
                raise ComponentFailure(
                    f"{self}: parameter {name!r} has shape {tuple(state[name].shape)}, "
                    f"but the spec says {param.shape}"
                )
        return state

    def canonical_numpy(self) -> dict[str, np.ndarray]:
        """The canonical parameters as float64 numpy arrays on the CPU: what the spec's references take."""
        return {name: value.detach().double().cpu().numpy() for name, value in self.canonical_state().items()}

    def parameter_gradients(self) -> dict[str, Tensor | None]:
        """The gradient of every canonical parameter after a backward pass, read through the module's
        real parameters: a view handed out by ``canonical_state_dict`` (a slice of a fused QKV weight)
        has no ``.grad`` of its own, so its gradient is the same slice of its base parameter's."""
        out: dict[str, Tensor | None] = {}
        for name, tensor_ in self.canonical_state().items():
            if tensor_.is_leaf or tensor_._base is None:
                out[name] = tensor_.grad
                continue
            base = next((p for p in self.module.parameters() if p is tensor_._base), None)
            if base is None or base.grad is None:
                out[name] = None
                continue
            # Re-apply the view to the base's gradient: same storage offset and strides.
            out[name] = base.grad.as_strided(tensor_.shape, tensor_.stride(),
                                             tensor_.storage_offset() - base.storage_offset())
        return out

    def load_canonical(self, params: dict[str, Tensor]) -> None:
        """Set the module's parameters from canonical ones (cast to the module's device and dtype)."""
        reference = next(iter(self.module.parameters()), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None else torch.float64
        params = {name: value.to(device=device, dtype=dtype) for name, value in params.items()}
        if hasattr(self.module, "load_canonical_state_dict"):
            try:
                with torch.no_grad():
                    self.module.load_canonical_state_dict(params)
            except Exception as exc:
                raise ComponentFailure(
                    f"{self}: load_canonical_state_dict raised {type(exc).__name__}: {exc}{where_raised(exc)}"
                ) from None
            # Read the weights back: a loader that skips a tensor would leave the module's own init in place,
            # and every property would then judge other weights than the reference's.
            state = self.canonical_state()
            wrong = [n for n, v in params.items() if n in state and not torch.equal(state[n].detach(), v)]
            if wrong:
                raise ComponentFailure(
                    f"{self}: after load_canonical_state_dict, canonical_state_dict() does not return the loaded "
                    f"values for {wrong}: the two must be inverse (see examples/fused_qkv_attention.py)"
                )
            return
        state = self.canonical_state()
        with torch.no_grad():
            for name, value in params.items():
                state[name].copy_(value)


def canonical_tensor(module: nn.Module, name: str, cache: dict | None = None) -> Tensor:
    """The tensor standing for canonical parameter ``name`` in ``module``.

    Composes through sub-modules: ``canonical_state_dict()`` first (fused layouts); then
    ``canonical_names`` (spec name -> own name, for a whole name or for a prefix such as
    ``{"self_attn": "attn"}``); then the name itself. A prefix leads into a sub-module, which resolves
    the rest of the name by the same rules, so a layer never restates the names of its attention.
    """
    # ``cache`` (id(module) -> its parameters / canonical_state_dict) keeps a whole state's lookup linear.
    cache = {} if cache is None else cache
    if hasattr(module, "canonical_state_dict"):
        if ("state", id(module)) not in cache:
            cache[("state", id(module))] = module.canonical_state_dict()
        state = cache[("state", id(module))]
        if name in state:
            return state[name]
    rename: dict[str, str] = getattr(module, "canonical_names", {}) or {}
    if ("own", id(module)) not in cache:
        cache[("own", id(module))] = dict(module.named_parameters())
    own = cache[("own", id(module))]
    theirs = rename.get(name, name)
    if theirs in own:
        return own[theirs]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that names a sub-module
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        target = rename.get(prefix, prefix)
        try:
            sub = module.get_submodule(target)
        except AttributeError:
            continue
        if sub is not module:
            return canonical_tensor(sub, rest, cache)
    raise KeyError(f"has no parameter {theirs!r} for the spec's {name!r}")


def call_arguments(offers: Offers, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call keywords actually passed.

    * a "call" option the implementation has built in (one offered value) is dropped; one the property
      leaves out means the spec default, which must then be offered (else the property lacks a ``needs``);
    * an "input" option's keyword (``mask``) must be offered when given; given as None, it is dropped
      where the implementation does not take it at all.
    """
    out = dict(kwargs)
    for opt in offers.entry.options:
        if opt.kind == "call":
            drawn_value(offers, opt.name, out.get(opt.name, opt.default))
            if opt.name in out and offers.fixed(opt.name):
                del out[opt.name]
        elif opt.kind == "input" and opt.argument in out:
            if out[opt.argument] is not None:
                drawn_value(offers, opt.name, True)
            elif not offers.offers(opt.name, True):
                del out[opt.argument]
    return out


def draw_parameters(spec: dict[str, Param], seed: int) -> dict[str, Tensor]:
    """Canonical parameters in float64 on the CPU, drawn from ``seed`` (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in spec.items():
        z = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        if param.init in ("weight", "scaled_embedding"):  # N(0, 1/d): d is the last axis either way
            out[name] = z / math.sqrt(param.shape[-1])
        elif param.init == "bias":
            out[name] = 0.1 * z
        elif param.init == "gain":
            out[name] = 1.0 + 0.1 * z
        else:
            out[name] = z
    return out


def _defect(label: str, component: str, call: str, text: str, *, remember: bool = False) -> None:
    """Raise a defect of the component as a whole (a call that did not return, hidden state, randomness);
    ``remember`` makes every later call of it fail at once with the same sentence. Every such failure is
    raised from this one line, with no exception context, so Hypothesis sees one failure when it replays."""
    __tracebackhide__ = True
    if remember:
        call_probes.DEFECTS[(label, component)] = text
    raise ComponentFailure(f"{label}: {call} {text}")


def invoke(entry: Component, fn: Callable, label: str, call: str, args: tuple, kwargs: dict[str, Any],
           *, probing: bool = False) -> Any:
    """``fn(*args, **kwargs)`` under the watchdog; an exception, ``sys.exit`` or a timeout becomes the
    component's failure (while ``probing``, an exception just returns None: the probe stays silent).
    ``checked_call`` builds on it for a component that returns one tensor; a property whose component
    returns something else (a tuple, a module, ids) calls this and checks the result itself."""
    __tracebackhide__ = True
    try:
        # Our own implementation (the baseline of every property) needs no watchdog: a timer per call,
        # tens of thousands of calls a run, is the wrapper's largest cost.
        with call_probes.watchdog(None if label == "ours" else RUN.call_timeout):
            return fn(*args, **kwargs)
    except ComponentFailure:
        raise
    except CallTimeout as exc:
        stopped = call_probes.location(exc)
        problem = (f"did not return within {call_probes.show_seconds(RUN.call_timeout)}"
                   + (f" (stopped {stopped})" if stopped.startswith("at ") else "")
                   + "; later calls of it are not attempted. Look for a loop that never ends, a sleep or a "
                   "wait (--call-timeout SECONDS sets the limit)")
    except SystemExit as exc:
        problem = None
        exit_message = (f"{label}: {call} called sys.exit({exc.code!r}){where_raised(exc)}: a component must "
                        "raise an exception (or return), never end the process")
    except Exception as exc:
        if probing:
            return None
        raise ComponentFailure(
            f"{label}: {call} raised {type(exc).__name__}: {exc}{where_raised(exc)}; "
            f"it was called with {describe_arguments(args, kwargs)}"
        ) from None
    # Outside the except blocks: these failures carry no exception context.
    if problem is not None:
        _defect(label, entry.name, call, problem, remember=True)
    raise ComponentFailure(exit_message)


def guarded_call(entry: Component, fn: Callable, label: str, call: str, args: tuple, kwargs: dict[str, Any], *,
                 offers: Offers | None = None) -> Any:
    """The call of a component that returns something other than one tensor (a tuple, a module, ids):
    a defect already found, an exception, ``sys.exit``, a call that does not return and an input modified
    in place are its failure; with ``offers``, the call is recorded for the precision diagnosis. The
    caller checks what it returned (``checked_call`` does that for one tensor)."""
    __tracebackhide__ = True
    known = call_probes.DEFECTS.get((label, entry.name))
    if known:
        _defect(label, entry.name, call, known)
    if offers is not None:
        precision.record(offers, fn, args, kwargs, label)
    before = call_probes.snapshot(args, kwargs)
    out = invoke(entry, fn, label, call, args, kwargs)
    changed = call_probes.modified_inputs(fn, before)
    if changed:
        raise ComponentFailure(f"{label}: {call} {changed}")
    return out


def checked_call(
    entry: Component, fn: Callable, label: str, call: str, args: tuple, kwargs: dict[str, Any],
    *, probe: bool = False,
) -> Tensor:
    """Call a component and check what it did before any math is judged: an exception, ``sys.exit``, a call
    that does not return, an input modified in place, a wrong type or shape, NaN for finite inputs; with
    ``probe`` (a built module's or a function handle's first call) also randomness and hidden state, by
    calling it again (properties/call_probes.py)."""
    __tracebackhide__ = True
    known = call_probes.DEFECTS.get((label, entry.name))
    if known:
        _defect(label, entry.name, call, known)
    before = call_probes.snapshot(args, kwargs)
    probe = probe and call_probes.take_probe(label, entry.name, fn, args, kwargs)
    pristine = call_probes.pristine_copy(fn) if probe else None
    out = invoke(entry, fn, label, call, args, kwargs)
    changed = call_probes.modified_inputs(fn, before)
    if changed:
        raise ComponentFailure(f"{label}: {call} {changed}")
    if not isinstance(out, Tensor):
        raise ComponentFailure(
            f"{label}: {call} returned a {type(out).__name__}; the spec's {entry.name} returns one tensor"
            + (" (return the output alone, not (output, weights))" if isinstance(out, tuple) else "")
        )
    if entry.output_shape is not None:
        want = tuple(entry.output_shape(*args, **kwargs))
        if tuple(out.shape) != want:
            raise ComponentFailure(
                f"{label}: {call} returned shape {tuple(out.shape)}, but the spec says {want} "
                f"for {describe_arguments(args, kwargs)}"
            )
    inputs_finite = all(
        torch.isfinite(a).all() for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()
    )
    if inputs_finite and out.is_floating_point() and not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero()
        mask = kwargs.get("mask")
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and bool(mask.all()):
            why = ("The mask allowed every key (all True), so check its polarity: "
                   "True = may attend, as F.scaled_dot_product_attention reads it.")
        elif any(isinstance(a, Tensor) and a.dtype == torch.bool for a in (*args, *kwargs.values())):
            why = "A row whose entries are all masked must give zeros, not softmax over -inf."
        else:
            why = "Look for 0/0 (a missing eps) or an overflowing exp (subtract the row maximum first)."
        raise ComponentFailure(
            f"{label}: {call} returned {len(bad)} non-finite value(s) (NaN or inf) for finite inputs, "
            f"first at index {tuple(bad[0].tolist())}. {why}"
        )
    if probe:
        found = call_probes.repeat_probe(
            fn, pristine, args, kwargs, out,
            lambda f, a, k: invoke(entry, f, label, call, a, k, probing=True), key=(label, entry.name),
        )
        if found:
            _defect(label, entry.name, call, found, remember=True)
    return out


def describe_arguments(args: tuple, kwargs: dict[str, Any]) -> str:
    def one(a: Any) -> str:
        if isinstance(a, Tensor):
            return f"{str(a.dtype).removeprefix('torch.')}{tuple(a.shape)}"
        return repr(a)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def backward(loss: Tensor, who: object) -> None:
    """``loss.backward()``, with autograd errors reported as the component's failure."""
    try:
        loss.backward()
    except RuntimeError as exc:
        hint = ""
        if "inplace" in str(exc) or "in-place" in str(exc):
            hint = (
                " Hint: an in-place operation (masked_fill_, +=, [...] = ) overwrote a tensor that autograd "
                "saved for the backward pass; use the out-of-place form (masked_fill)."
            )
        raise ComponentFailure(f"{who}: backward raised RuntimeError: {exc}.{hint}") from None


# ---------------------------------------------------------------------------------------------------
# Loading what --impl names


def load_implementation(target: str) -> Implementation:
    """A built-in name ("ours", "pytorch"), a path to a .py file, or an importable module name."""
    if target in BUILTIN_TARGETS:
        impl = Implementation(target, importlib.import_module(BUILTIN_TARGETS[target]))
        call_probes.add_implementation_root(impl.namespace)
        impl.validate()
        return impl
    path = Path(target)
    if target.endswith(".py") or path.exists():
        if not path.is_file():
            raise ImplementationLoadError(f"--impl {target}: there is no such file")
        module = _import_file(path)
        label = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise ImplementationLoadError(
                    f"--impl {target}: no module named {exc.name!r}. Give a path to a .py file "
                    "or the name of an importable module."
                ) from None
            raise ImplementationLoadError(_import_failure(target, exc)) from None
        except (Exception, SystemExit) as exc:
            raise ImplementationLoadError(_import_failure(target, exc)) from None
        label = target
    call_probes.add_implementation_root(module)
    if not Implementation(label, module).provided():
        raise ImplementationLoadError(
            f"--impl {target}: the module defines none of the spec's components. "
            f"Define some of: {', '.join(COMPONENTS)}."
        )
    impl = Implementation(label, module)
    impl.validate()
    return impl


def _import_file(path: Path) -> ModuleType:
    name = f"_impl_under_test_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImplementationLoadError(f"--impl {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so dataclasses and pickling inside it work
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # sys.exit() at import is a broken file, not the end of the run
        del sys.modules[name]
        raise ImplementationLoadError(_import_failure(str(path), exc)) from None
    return module


def _import_failure(target: str, exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"--impl {target} called sys.exit({exc.code!r}) while being imported{where_raised(exc)}"
    return f"--impl {target} failed to import: {type(exc).__name__}: {exc}{where_raised(exc)}"
