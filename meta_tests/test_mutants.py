"""The suite tests itself: every mutant is caught by the properties it names, and every property catches
at least one mutant (a property that cannot fail is a defect)."""

from __future__ import annotations

import pytest

from meta_tests.catalog import all_properties, arguments_for, load_catalog, quick_settings
from properties.plugin import COMPONENTS

MUTANTS = load_catalog()
PROPERTIES = all_properties()
CASES = [(m, p) for m in MUTANTS for p in m.caught_by]


@pytest.mark.parametrize("mutant, prop", CASES, ids=[f"{m.name} <- {p}" for m, p in CASES])
def test_mutant_is_caught_by_property(mutant, prop):
    """Running ``prop`` on ``mutant`` fails (an AssertionError, the suite's failure type)."""
    assert prop in PROPERTIES, f"{mutant.name} names {prop}, which is not a property in properties/"
    fn = PROPERTIES[prop]
    with quick_settings(fn), pytest.raises(AssertionError) as caught:
        fn(**arguments_for(fn, mutant))
    # The failure must speak the suite's language, not be a stray assert deep in a helper.
    message = str(caught.value)
    assert message.strip(), f"{prop} failed on {mutant.name} with an empty message"


def test_every_property_catches_a_mutant():
    caught = {p for m in MUTANTS for p in m.caught_by}
    uncaught = sorted(set(PROPERTIES) - caught)
    assert not uncaught, f"these properties catch no mutant in meta_tests/mutants: {uncaught}"


def test_every_mutant_names_a_spec_component_and_a_property():
    for m in MUTANTS:
        assert m.provides in COMPONENTS, f"mutant {m.name} stands in for unknown component {m.provides}"
        assert m.caught_by, f"mutant {m.name} names no property that catches it"


def test_every_property_declares_the_components_it_needs():
    """A property names its components (a `component` parameter or a `requires` marker), so that an
    implementation without them is skipped at collection with "<name> is not provided by <module>"."""
    import sys

    undeclared = []
    for name, fn in PROPERTIES.items():
        module_marks = getattr(sys.modules[fn.__module__], "pytestmark", [])
        module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
        marks = list(getattr(fn, "pytestmark", [])) + [getattr(m, "mark", m) for m in module_marks]
        declared = any(m.name == "requires" for m in marks) or any(
            m.name == "parametrize" and "component" in str(m.args[0]) for m in marks
        )
        if not declared:
            undeclared.append(name)
    assert not undeclared, f"these properties do not declare their components: {undeclared}"
