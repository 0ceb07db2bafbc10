"""The plug-in point.

    pytest -n auto                                   # our implementations and PyTorch's own modules
    pytest -n auto --impl path/to/yours.py           # a learner's file ...
    pytest -n auto --impl your_package.attention     # ... or an importable module
    TRANSFORMER_SPEC_IMPL=path/to/yours.py pytest -n auto   # the same, for CI configurations
    pytest --hypothesis-profile=thorough             # profiles: fast, ci (default), thorough

Every property takes the fixture ``impl`` (the implementation under test) and, where it runs tensors,
``device`` (cpu, and cuda when torch sees a GPU). A property that needs a component the implementation
does not define is skipped with "<name> is not provided by <module>"; ours is never substituted.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, settings

from properties.options import unmet_needs
from properties.plugin import DEFAULT_TARGETS, ImplementationLoadError, load_implementation

IMPL_ENV = "TRANSFORMER_SPEC_IMPL"
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Profiles. Deadlines are off: torch's first call of an op (kernel selection, lazy init, CUDA context)
# takes far longer than the rest, and a deadline would flag warm-up, not the implementation.
# too_slow stays on: our strategies draw small shapes, so a slow draw is a real problem.
# One failure per property (report_multiple_bugs=False) and no "explain" phase keep a report short: the
# claim, the shrunk configuration, the error and the hint.
QUIET = dict(deadline=None, print_blob=True, report_multiple_bugs=False,
             phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
settings.register_profile("fast", max_examples=10, **QUIET)
# CI replays the same examples every run (derandomize): a red CI is never a coin toss.
settings.register_profile("ci", max_examples=20, derandomize=True, database=None, **QUIET)
settings.register_profile("thorough", max_examples=400, **QUIET)
# Health checks stay on in every profile: strategies build valid inputs instead of filtering them.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--impl",
        action="append",
        default=None,
        metavar="FILE_OR_MODULE",
        help=(
            "implementation under test: a .py file, an importable module, or a built-in name "
            f"(ours, pytorch); repeatable. Default: {', '.join(DEFAULT_TARGETS)}. "
            f"Also read from ${IMPL_ENV} (comma-separated)."
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    targets = config.getoption("--impl") or [
        t.strip() for t in os.environ.get(IMPL_ENV, "").split(",") if t.strip()
    ]
    try:
        config.implementations = [load_implementation(t) for t in (targets or DEFAULT_TARGETS)]
    except ImplementationLoadError as exc:
        raise pytest.UsageError(str(exc)) from None
    # The suite's tensors are tiny: torch's intra-op threads cost far more than they save, and under
    # `pytest -n auto` every core already runs a worker (2 workers x 2 threads made a 1 ms forward 100x slower).
    torch.set_num_threads(1)
    # Exactness claims must not meet TF32 matmuls (off by default for matmul, on for cuDNN convolutions).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config: pytest.Config) -> list[str]:
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "not available (CUDA cases skip)"
    return [
        "implementations under test: " + ", ".join(i.label for i in config.implementations),
        f"hypothesis profile: {settings.get_current_profile_name()}; torch {torch.__version__}; CUDA: {cuda}",
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    impls = metafunc.config.implementations
    if "impl" in metafunc.fixturenames:
        # Session scope: Hypothesis rejects function-scoped fixtures under @given.
        metafunc.parametrize("impl", impls, ids=[i.label for i in impls], scope="session")
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", "cuda"], scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        device, dtype, impl = params.get("device"), params.get("dtype"), params.get("impl")
        if device == "cuda" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="CUDA is not available on this machine"))
            continue
        if device == "cpu" and dtype in LOW_PRECISION:
            item.add_marker(pytest.mark.skip(reason=f"{dtype} is judged on CUDA only"))
            continue
        if impl is None:
            continue
        needed = [params["component"]] if "component" in params else []
        for marker in item.iter_markers("requires"):
            needed.extend(marker.args)
        missing = [name for name in needed if not impl.provides(name)]
        if missing:
            item.add_marker(pytest.mark.skip(reason="; ".join(impl.missing_reason(n) for n in missing)))
            continue
        reason = unmet_needs(impl, needed, item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
