"""Print the README's catalog of properties (from the properties' own docstrings) and its table of
options (from the spec's option space).

    python -m meta_tests.readme_catalog             # the catalog of properties
    python -m meta_tests.readme_catalog --options   # the table of declarable options

``meta_tests/test_mutants.py`` checks that the README names every property and every option, so neither
can drift.
"""

from __future__ import annotations

import inspect

from meta_tests.catalog import all_properties, load_catalog


def first_sentence(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split())


def catalog_markdown() -> str:
    mutants = load_catalog()
    by_module: dict[str, list[str]] = {}
    for name, fn in sorted(all_properties().items(), key=lambda kv: (kv[1].__module__, kv[1].__code__.co_firstlineno)):
        catching = sorted(m.name for m in mutants if name in m.caught_by)
        by_module.setdefault(fn.__module__.split(".")[-1], []).append(
            f"| `{name}` | {first_sentence(fn)} | {len(catching)} |"
        )
    out = []
    for module, rows in by_module.items():
        out += [f"#### properties/{module}.py", "", "| property | claim | mutants caught |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


def option_row(component: str, option) -> str:
    values = ", ".join(f"`{v!r}`" for v in option.values)
    if option.accepts is not None:
        values += ", or another value its meaning allows"
    return f"| `{component}` | `{option.name}` | {values} | {option.kind} | {option.doc} |"


def options_markdown() -> str:
    from spec import COMPONENTS

    rows = [option_row(name, opt) for name, entry in COMPONENTS.items() for opt in entry.options]
    return "\n".join(["| component | option | values (spec default first) | kind | meaning |",
                      "|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    import sys

    print(options_markdown() if "--options" in sys.argv else catalog_markdown())
