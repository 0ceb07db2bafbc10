"""The option space an implementation offers, and how properties respect it.

Every spec component lists its options (spec/registry.Option): constructor keywords (``bias``, ``eps``,
``norm_first``), call keywords (``causal``) and input regimes the properties draw (a mask given or not,
s != t, a fully masked row, per-sequence positions). An implementation narrows that space with one
declaration per component, a ``spec_options`` attribute on the class or function::

    class CausalSelfAttention(nn.Module):
        spec_options = {"causal": True, "mask": False, "bias": False}   # causal only, no mask, no biases

    def attention(q, k, v): ...
    attention.spec_options = {"causal": False, "mask": False}

Each entry is the value offered, or a tuple/list of the values offered. Undeclared options offer every
value the spec defines. For an input regime (kind "input": a mask, s != t, ...) True means "offered"
and implies the regime's absence too; False means "never". One reserved key is not an option: ``"compute_dtype": torch.float32`` (or
``"float32"``) declares that the component computes in float32 whatever its input, so its float64 checks
are judged by the float32 rule (properties/assertions.py) and the reports say so.

The rules the suite follows:
* An option with a single offered value is never passed: the implementation has it built in (a causal-only
  module is called without ``causal``, a fixed-eps norm built without ``eps``). An option offered with
  several values is always passed explicitly, defaults included.
* Strategies draw only offered values (``Offers.strategy``); a property that needs a value that is not
  offered is skipped at collection with "needs causal=False; MyAttention offers causal=True only"
  (``@pytest.mark.needs(causal=False)``).
* An unknown option, an invalid value, or a declaration on something that is not a spec component is a
  usage error naming the valid ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from hypothesis import strategies as st

from spec import COMPONENTS, Component, Option

DECLARATION = "spec_options"
COMPUTE_DTYPE = "compute_dtype"
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
                  torch.float64: torch.float64}


class DeclarationError(Exception):
    """A ``spec_options`` declaration that names an unknown option or value (reported as a usage error)."""


def _as_values(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)


def _show(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class Offers:
    """What one implementation's component offers: option name -> offered values (spec order)."""

    component: str
    owner: str  # how the report names the implementation's object ("MyAttention in model.py")
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    compute_dtype: torch.dtype | None = None
    declared: frozenset[str] = frozenset()
    inferred: frozenset[str] = frozenset()  # narrowed because the signature lacks the keyword

    @property
    def entry(self) -> Component:
        return COMPONENTS[self.component]

    def offered(self, option: str) -> tuple[Any, ...]:
        return self.values[option]

    def offers(self, option: str, value: Any = True) -> bool:
        return any(_same(value, v) for v in self.values[option])

    def fixed(self, option: str) -> bool:
        """A single offered value: the implementation has it built in, so it is never passed."""
        return len(self.values[option]) == 1

    def default(self, option: str) -> Any:
        """The value used when a property does not draw this option: the spec default if offered, else
        the implementation's own (first declared) value."""
        values = self.values[option]
        spec_default = self.entry.option(option).default
        return spec_default if any(_same(spec_default, v) for v in values) else values[0]

    def strategy(self, option: str) -> st.SearchStrategy[Any]:
        """Hypothesis draws over the offered values, shrinking towards the spec default."""
        values = self.values[option]
        return st.just(values[0]) if len(values) == 1 else st.sampled_from(values)

    def where(self, option: str, predicate) -> tuple[Any, ...]:
        """Offered values satisfying ``predicate`` (a property that only makes sense for some)."""
        return tuple(v for v in self.values[option] if predicate(v))

    def describe(self, option: str) -> str:
        values = self.values[option]
        only = " only" if len(values) == 1 else ""
        why = ""
        if option in self.inferred:
            keyword = self.entry.option(option).argument or option
            why = f" (its signature has no {keyword!r}; declare spec_options to say otherwise)"
        return f"{self.owner} offers {option}={_show(values)}{only}{why}"

    def __repr__(self) -> str:
        declared = ", ".join(f"{k}={self.values[k]!r}" for k in sorted(self.declared) if k in self.values)
        return f"Offers({self.owner}{': ' + declared if declared else ''})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))

    def __and__(self, other: Offers) -> Offers:
        """The options two components both offer (a relational property calls both the same way)."""
        shared = {name: tuple(v for v in vals if any(_same(v, w) for w in other.values[name]))
                  for name, vals in self.values.items() if name in other.values}
        return Offers(self.component, f"{self.owner} and {other.owner}", {**other.values, **self.values, **shared},
                      self.compute_dtype or other.compute_dtype, self.declared | other.declared,
                      self.inferred | other.inferred)


def _same(a: Any, b: Any) -> bool:
    return a == b and (isinstance(a, bool) == isinstance(b, bool))


def full_offers(component: str, owner: str = "the spec") -> Offers:
    """Everything the spec defines (an implementation that declares nothing)."""
    entry = COMPONENTS[component]
    return Offers(component, owner, {opt.name: opt.values[:1] if opt.kind == "convention" else tuple(opt.values)
                                     for opt in entry.options})


def read_declaration(component: str, obj: Any, owner: str) -> Offers:
    """Validate ``obj.spec_options`` against the component's option space and return the offers."""
    entry = COMPONENTS[component]
    declared = getattr(obj, DECLARATION, None)
    offers = inferred_offers(component, obj, full_offers(component, owner), set(declared or ()))
    if declared is None:
        return offers
    if not isinstance(declared, dict):
        raise DeclarationError(f"{owner}: {DECLARATION} must be a dict of option -> offered value(s), "
                               f"not {type(declared).__name__}")
    values = dict(offers.values)
    compute_dtype = None
    known = {opt.name: opt for opt in entry.options}
    own = vars(obj).get(DECLARATION) if isinstance(obj, type) else declared
    if own is None:
        # Inherited from a base class declared for another spec component (a CrossAttention subclassing
        # a MultiHeadAttention that declares rotary=False): keep what applies here, drop the rest.
        declared = {k: v for k, v in declared.items() if k in known or k == COMPUTE_DTYPE}
    for name, value in declared.items():
        if name == COMPUTE_DTYPE:
            if value not in COMPUTE_DTYPES:
                raise DeclarationError(f"{owner}: {COMPUTE_DTYPE}={value!r} is not one of 'float32', 'float64'")
            compute_dtype = COMPUTE_DTYPES[value]
            continue
        if name not in known:
            valid = ", ".join(sorted(known)) or "none"
            raise DeclarationError(
                f"{owner}: {DECLARATION} names {name!r}, which is not an option of the spec's {component}. "
                f"Its options are: {valid} (and {COMPUTE_DTYPE})."
            )
        opt = known[name]
        offered = _as_values(value)
        bad = [v for v in offered if not opt.valid(v)]
        if bad or not offered:
            raise DeclarationError(
                f"{owner}: {DECLARATION}[{name!r}] = {value!r} is not valid; {component}'s {name} "
                f"takes {_describe_option(opt)}."
            )
        if opt.kind == "input" and any(_same(True, v) for v in offered):
            # An input regime offered can also be left out: a module that takes a mask is also called
            # without one. Only False narrows ("never give it a mask").
            offered = (*offered, False)
        # Keep the spec's order (default first) for values the spec lists; open-domain values follow.
        ordered = [v for v in opt.values if any(_same(v, w) for w in offered)]
        ordered += [v for v in offered if not any(_same(v, w) for w in ordered)]
        values[name] = tuple(ordered)
    return Offers(component, owner, values, compute_dtype, frozenset(declared) - {COMPUTE_DTYPE}, offers.inferred)


# Methods whose keywords count as the component's (a model's cache= may be taken by generate or decode).
SIGNATURE_METHODS = ("__init__", "forward", "generate", "encode", "decode")


def _keywords(obj: Any) -> tuple[set[str], set[str], bool] | None:
    """(constructor keywords, call keywords, any **kwargs) of a class or function; None if unreadable."""
    try:
        if isinstance(obj, type):
            init = set(inspect.signature(obj.__init__).parameters)
            call: set[str] = set()
            params = [inspect.signature(obj.__init__).parameters]
            for method in SIGNATURE_METHODS[1:]:
                if callable(getattr(obj, method, None)):
                    sig = inspect.signature(getattr(obj, method)).parameters
                    call |= set(sig)
                    params.append(sig)
        else:
            sig = inspect.signature(obj).parameters
            init, call, params = set(), set(sig), [sig]
    except (TypeError, ValueError):
        return None
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for sig in params for p in sig.values())
    return init, call, var_kw


def inferred_offers(component: str, obj: Any, offers: Offers, declared: set[str]) -> Offers:
    """Narrow undeclared options by the signature: a constructor without ``bias`` offers the spec's
    default only, a forward without ``causal`` offers causal=False only, one without ``mask`` takes no
    mask. A signature with ``**kwargs`` says nothing, and a declaration always wins."""
    keywords = _keywords(obj)
    if keywords is None or keywords[2]:
        return offers
    init, call, _ = keywords
    values, inferred = dict(offers.values), set()
    for opt in offers.entry.options:
        if opt.name in declared or opt.name not in values:
            continue
        if opt.kind == "init" and isinstance(obj, type) and opt.name not in init:
            values[opt.name], _ = (opt.default,), inferred.add(opt.name)
        elif opt.kind == "call" and opt.name not in call:
            values[opt.name], _ = (opt.default,), inferred.add(opt.name)
        elif opt.kind == "input" and opt.argument and opt.argument not in init | call:
            values[opt.name], _ = (False,), inferred.add(opt.name)
    return Offers(component, offers.owner, values, offers.compute_dtype, offers.declared, frozenset(inferred))


def _describe_option(opt: Option) -> str:
    if opt.accepts is not None:
        return f"{_show(opt.values)} or another value its meaning allows ({opt.doc})"
    return _show(opt.values)


# ---------------------------------------------------------------------------------------------------
# What a property needs


def unmet_need(offers: Offers, needs: dict[str, Any]) -> str | None:
    """The skip reason if ``offers`` lacks what a property needs, else None.

    A need is ``option=value`` (the value must be offered) or ``option=callable`` (some offered value
    must satisfy it, e.g. ``eps=lambda v: v > 0``)."""
    for name, want in needs.items():
        if name not in offers.values:
            continue  # the option is not in this component's space: nothing to need
        if callable(want):
            if not offers.where(name, want):
                label = getattr(want, "__doc__", None) or "another value"
                return f"needs {name}={label}; {offers.describe(name)}"
        elif not offers.offers(name, want):
            return f"needs {name}={want!r}; {offers.describe(name)}"
    return None


def drawn_value(offers: Offers, option: str, value: Any) -> None:
    """Guard for the suite itself: a value a strategy drew must be offered (a suite bug otherwise)."""
    if option not in offers.values or offers.offers(option, value):
        return
    opt = offers.entry.option(option)
    if opt.accepts is not None and option not in offers.declared and opt.valid(value):
        return  # an open domain (eps, base) that the implementation did not narrow: any valid value
    raise AssertionError(
        f"suite bug: a strategy drew {option}={value!r} for {offers.owner}, which offers "
        f"{_show(offers.values[option])} only; the strategy must draw from Offers.strategy({option!r})"
    )


def unmet_needs(impl, components: list[str], item) -> str | None:
    """The skip reason for a collected property whose ``@pytest.mark.needs(option=value, ...)`` some of
    its components do not offer (``needs("Name", ...)`` restricts a mark to one component)."""
    for mark in item.iter_markers("needs"):
        targets = [a for a in mark.args if a in components] if mark.args else components
        for name in targets:
            reason = unmet_need(impl.offers(name), mark.kwargs)
            if reason:
                return reason
    return None


# ---------------------------------------------------------------------------------------------------
# Strategies that draw options register here, so a meta test (meta_tests/test_options.py) can prove
# that each consults the offers it is given: narrowed to one value, it draws only that value; given
# the full space, it draws more than one.

@dataclass(frozen=True)
class OptionStrategy:
    fn: Any  # fn(offers, **kwargs) -> SearchStrategy
    component: str
    readers: dict[str, Any]  # option -> function(drawn example) -> the option's value in it
    kwargs: dict[str, Any] = field(default_factory=dict)


OPTION_STRATEGIES: list[OptionStrategy] = []


def draws_options(component: str, *, kwargs: dict[str, Any] | None = None, **readers):
    """Register a strategy ``fn(offers, **kwargs)`` that draws the given options for ``component``;
    each reader maps a drawn example to the option's value in it, e.g.
    ``@draws_options("MultiHeadAttention", causal=lambda case: case.causal)``. ``kwargs`` are the
    arguments the meta test calls it with (beyond ``offers``)."""

    def register(fn):
        OPTION_STRATEGIES.append(OptionStrategy(fn, component, readers, dict(kwargs or {})))
        return fn

    return register


def narrowed(offers: Offers, **values: Any) -> Offers:
    """``offers`` with some options narrowed (what a declaration does); used by the meta tests."""
    new = dict(offers.values)
    for name, value in values.items():
        new[name] = _as_values(value)
    return Offers(offers.component, offers.owner, new, offers.compute_dtype, offers.declared | frozenset(values))
