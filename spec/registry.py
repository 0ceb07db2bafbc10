"""The registry of components: every spec module declares its components here, by name.

The suite reaches an implementation only through these names, so a learner's module plugs in by
defining the same names (see README, "Check your own implementation").
"""

from __future__ import annotations

from dataclasses import dataclass, field
import importlib
import pkgutil
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Param:
    """A canonical parameter: its shape and how the suite initialises it.

    ``init`` is one of:
      * ``"weight"``: a matrix, drawn N(0, 1/fan_in) so activations keep unit scale;
      * ``"bias"``: drawn N(0, 0.1^2), nonzero so that a bias added in the wrong place shows;
      * ``"gain"``: a per-feature scale, drawn 1 + N(0, 0.1^2);
      * ``"embedding"``: a lookup table, drawn N(0, 1);
      * ``"scaled_embedding"``: a table the model multiplies by sqrt(d) (the original transformer), drawn
        N(0, 1/d) so that the scaled rows have unit scale. N(0, 1) rows times sqrt(d) would saturate
        every softmax downstream, and a saturated softmax hides real dependencies below float64 rounding.
    """

    shape: tuple[int, ...]
    init: Literal["weight", "bias", "gain", "embedding", "scaled_embedding"] = "weight"


@dataclass(frozen=True)
class Option:
    """One dimension of a component's option space: a constructor or call keyword, or an input regime the
    properties draw. An implementation narrows it with a declaration (``spec_options``, see
    properties/options.py); the properties draw only what it offers and skip what needs the rest.

    name:     the option's name, as a declaration writes it (``causal``, ``bias``, ``mask``, ``eps``).
    values:   the values the spec defines, the spec's default first (properties shrink towards it). For an
              open domain (``eps``, ``base``) these are the values the properties draw; any value that
              ``accepts`` may be declared.
    kind:     "init": a constructor keyword; "call": a keyword of the call; "input": an input regime (a
              mask given or not, s != t, a fully masked row, ...); "convention": a choice the spec pins
              but accepts declared otherwise (GQA head grouping), never passed: an undeclared
              implementation offers the default only, and the references follow a declared value. An
              option whose implementation offers a single value is never passed: it is built in.
    argument: for "input" options: the call keyword whose presence the option controls (``mask``).
    accepts:  for an open domain, which declared values are valid (None: only ``values``).
    doc:      one line for usage errors and the README.
    """

    name: str
    values: tuple[Any, ...]
    kind: Literal["init", "call", "input", "convention"]
    doc: str
    argument: str | None = None
    accepts: Callable[[Any], bool] | None = field(default=None, compare=False)

    @property
    def default(self) -> Any:
        return self.values[0]

    def valid(self, value: Any) -> bool:
        if self.accepts is not None:
            try:
                return bool(self.accepts(value))
            except Exception:  # noqa: BLE001 (a declared value of the wrong type is simply invalid)
                return False
        return any(value == v and type(value) is type(v) for v in self.values) or value in self.values


def boolean(name: str, doc: str, *, default: bool = True, kind: str = "input", argument: str | None = None) -> Option:
    """A yes/no option, the spec's default first."""
    return Option(name, (default, not default), kind, doc, argument=argument)


def positive_float(name: str, doc: str, *, draws: tuple[float, ...], kind: str = "init") -> Option:
    """An open-domain positive number (eps, base): ``draws`` are what properties use, default first."""
    return Option(name, draws, kind, doc,
                  accepts=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)


@dataclass(frozen=True)
class Component:
    """One spec'd component.

    name:        the name an implementation module must define (a class or a function).
    kind:        "module" (an ``nn.Module`` subclass built with keyword arguments), "function", or
                 "class" (a helper object such as the KV cache, built with keyword arguments).
    family:      the file stem shared by spec/, implementations/ and properties/.
    summary:     one line for reports.
    parameters:  for modules, the canonical parameters given the constructor's keyword arguments.
    output_shape: the shape the component must return, given the arguments of its call (None: the
                 properties check shapes themselves).
    options:     the option space (see Option): everything an implementation may offer or lack.
    """

    name: str
    kind: Literal["module", "function", "class"]
    family: str
    summary: str
    parameters: Callable[..., dict[str, Param]] | None = field(default=None, compare=False)
    output_shape: Callable[..., tuple[int, ...]] | None = field(default=None, compare=False)
    options: tuple[Option, ...] = field(default=(), compare=False)

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise KeyError(f"{self.name} has no option {name!r}")


COMPONENTS: dict[str, Component] = {}


def same_shape_as_first_input(x, *args, **kwargs) -> tuple[int, ...]:
    """Most modules return the shape of their first input: (b, s, d) -> (b, s, d)."""
    return tuple(x.shape)


def component(entry: Component) -> Component:
    """Register a component; a name may be registered once."""
    if entry.name in COMPONENTS:
        raise ValueError(f"component {entry.name!r} is registered twice")
    COMPONENTS[entry.name] = entry
    return entry



def export_families(package_name: str, package_path: list[str]) -> dict[str, Any]:
    """Collect the components that a package's family modules list in ``__all__`` (implementations/,
    adapters/pytorch/), so adding a family needs no edit to a shared file."""
    names: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", []):
            if name in names and names[name] is not getattr(module, name):
                raise ValueError(f"{package_name}: {name} is exported by two family modules")
            names[name] = getattr(module, name)
    return names
