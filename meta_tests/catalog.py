"""The catalog of known-buggy implementations (mutants) and the machinery that runs properties on them.

A mutant is a realistic bug, written as the smallest change to one of our components. It declares the
properties that must catch it; ``meta_tests/test_mutants.py`` runs each of those properties against it
and requires a failure, and checks that every property in ``properties/`` catches at least one mutant.

    @mutant(bug="scores are not scaled by 1/sqrt(e)", caught_by=["test_sdpa_agrees_with_reference"])
    def scaled_dot_product_attention(q, k, v, *, mask=None, causal=False, scale=None): ...

The mutant stands in for the component of its ``provides`` name (default: the object's own name); every
other component comes from our implementations, so relational properties (MHA vs SelfAttention) work.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from hypothesis import Phase, settings

import implementations
import properties
from properties.plugin import Implementation

OURS = Implementation("ours", implementations)


@dataclass
class Mutant:
    name: str
    bug: str
    provides: str
    obj: Any
    caught_by: list[str]
    module: str = field(default="")
    params: dict[str, Any] = field(default_factory=dict)

    def implementation(self) -> Implementation:
        # No ignored-option probe: each property must catch the mutant by its own claim.
        return Implementation(f"mutant {self.name}", SimpleNamespace(**{self.provides: self.obj}), fallback=OURS,
                              probe_options=False)

    def __repr__(self) -> str:
        return self.name


MUTANTS: list[Mutant] = []


def mutant(
    *,
    bug: str,
    caught_by: list[str],
    provides: str | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
):
    """Register the decorated function or class as a mutant of component ``provides``.

    ``params`` picks values for the properties' ``@pytest.mark.parametrize`` arguments (by name) where the
    default choice (the mutant's component, float64, else the first value) would not show the bug.
    """

    def register(obj: Any) -> Any:
        entry = Mutant(
            name=name or f"{provides or obj.__name__}:{bug}",
            bug=bug,
            provides=provides or obj.__name__,
            obj=obj,
            caught_by=list(caught_by),
            module=obj.__module__,
            params=dict(params or {}),
        )
        if any(m.name == entry.name for m in MUTANTS):
            raise ValueError(f"mutant {entry.name!r} is registered twice")
        MUTANTS.append(entry)
        return obj

    return register


def load_catalog() -> list[Mutant]:
    """Import every module of meta_tests/mutants (registering their mutants) and return the catalog."""
    from meta_tests import mutants

    for info in pkgutil.iter_modules(mutants.__path__):
        importlib.import_module(f"meta_tests.mutants.{info.name}")
    return MUTANTS


def all_properties() -> dict[str, Callable]:
    """Every property: the test functions of properties/test_*.py, by name (names are unique)."""
    found: dict[str, Callable] = {}
    for info in pkgutil.iter_modules(properties.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"properties.{info.name}")
        for attr, value in vars(module).items():
            if attr.startswith("test_") and callable(value) and getattr(value, "__module__", "") == module.__name__:
                if attr in found:
                    raise ValueError(f"property name {attr} is used twice")
                found[attr] = value
    return found


def parametrization(prop: Callable) -> dict[str, list[Any]]:
    """The ``@pytest.mark.parametrize`` values of a property, by argument name."""
    values: dict[str, list[Any]] = {}
    for mark in getattr(prop, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, argvalues = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        # pytest.param(value, id=..., marks=...) -> its value(s)
        argvalues = [v.values if hasattr(v, "values") and hasattr(v, "marks") else (v,) if len(names) == 1 else v
                     for v in argvalues]
        argvalues = [row[0] if len(names) == 1 else row for row in argvalues]
        if len(names) == 1:
            values[names[0]] = list(argvalues)
        else:
            for i, n in enumerate(names):
                values[n] = [row[i] for row in argvalues]
    return values


def arguments_for(prop: Callable, m: Mutant) -> dict[str, Any]:
    """The fixture and parameter values to run ``prop`` on mutant ``m``: the CPU, float64 where the
    property has a dtype, the mutant's own component where the property is parametrized by it, and the
    mutant's ``params`` or else each parameter's first value."""
    import inspect

    import torch

    wanted = inspect.signature(prop).parameters
    params = parametrization(prop)
    args: dict[str, Any] = {"impl": m.implementation()}
    if "device" in wanted:
        args["device"] = "cpu"
    for name, values in params.items():
        if name in m.params:
            args[name] = m.params[name]
        elif name == "component":
            # The mutant's own component where the property covers it; otherwise the mutant is a helper
            # the property uses (a KVCache inside cached attention), and the first component will do.
            args[name] = m.provides if m.provides in values else values[0]
        elif name == "dtype":
            args[name] = torch.float64 if torch.float64 in values else values[0]
        else:
            args[name] = values[0]
    return args


@contextlib.contextmanager
def quick_settings(prop: Callable) -> Iterator[None]:
    """Run a property without shrinking or the example database: the meta test needs *a* failure, not
    the smallest one, and must not leave mutants' examples behind. Hypothesis keeps a test's settings on
    this attribute (its pytest plugin adjusts it the same way)."""
    if not hasattr(prop, "_hypothesis_internal_use_settings"):  # a plain test (learnability): nothing to adjust
        yield
        return
    original = prop._hypothesis_internal_use_settings
    prop._hypothesis_internal_use_settings = settings(
        original,
        phases=[Phase.explicit, Phase.generate],
        database=None,
        derandomize=True,
        report_multiple_bugs=False,
        max_examples=max(original.max_examples, 50),
    )
    # Hypothesis' pytest plugin leaves the digest of the last parametrization on the inner test, and the
    # derandomized seed includes it: without this, which examples a mutant meets would depend on whether
    # (and with which parameters) pytest ran the property earlier in the same process.
    inner = prop.hypothesis.inner_test
    digest = inner.__dict__.pop("_hypothesis_internal_add_digest", None)
    try:
        yield
    finally:
        prop._hypothesis_internal_use_settings = original
        if digest is not None:
            inner._hypothesis_internal_add_digest = digest
