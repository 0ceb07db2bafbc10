"""The suite as a pytest plugin: ``--impl``, the scorecard, CUDA cases, threads left running.

    pytest -n auto                                   # our implementations and PyTorch's own modules
    pytest -n auto --impl /anywhere/model.py         # a learner's file, from any directory ...
    pytest -n auto --impl your_package.attention     # ... or an importable module
    TRANSFORMER_SPEC_IMPL=model.py pytest -n auto    # the same, for CI configurations
    pytest -n auto --impl model.py --scorecard card.md   # also write the scorecard (.md, .json, or both)
    pytest --hypothesis-profile=thorough             # profiles: fast, ci (default), thorough

The package registers this module under the ``pytest11`` entry point ``transformer_spec``
(pyproject.toml), so pytest loads it before it reads the command line: ``--impl PATH`` (with a space) is
an option with its value wherever PATH is, not a test path. Under ``--impl`` the suite runs its own
``properties/`` (found next to this file, wherever pytest was started) unless test paths are given;
``meta_tests/`` only when asked for. In another project's test run (no ``--impl``, none of this suite's
tests) it does nothing.

Every property takes the fixture ``impl`` (the implementation under test) and, where it runs tensors,
``device`` (cpu, and cuda when torch sees a GPU; without one the CUDA cases are deselected and counted in
one line). A property that needs a component the implementation does not define is skipped with
"<name> is not provided by <module>"; ours is never substituted.

At the end of a run under ``--impl`` a scorecard says, per component, which claims held, failed and were
skipped (and why), each failed claim once with the configuration Hypothesis shrank to, its ``seen`` and
``hint``, and one line for a cause shared by several properties. ``--scorecard PATH`` writes it as
Markdown (PATH ends in .md), JSON (.json), or both (PATH.md and PATH.json for any other PATH).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUITE_ROOT = Path(__file__).resolve().parent.parent
PROPERTIES_DIR = SUITE_ROOT / "properties"
META_TESTS_DIR = SUITE_ROOT / "meta_tests"
IMPL_ENV = "TRANSFORMER_SPEC_IMPL"
DEFAULT_CALL_TIMEOUT = 10.0
NO_CUDA = "CUDA is not available on this machine"
SPEC_INFO = "transformer_spec"  # the user property our items carry: implementation, component, property
SPEC_FAILURE = "transformer_spec_failure"


def _own(path: Any) -> bool:
    """Is ``path`` one of this suite's test files (properties/ or meta_tests/)?"""
    try:
        path = Path(str(path)).resolve()
    except OSError:
        return False
    return path.is_relative_to(PROPERTIES_DIR) or path.is_relative_to(META_TESTS_DIR)


def _targets(option: list[str] | None) -> list[str]:
    return list(option or []) or [t.strip() for t in os.environ.get(IMPL_ENV, "").split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------------
# Options and where the run is rooted


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("transformer-spec", "transformer-spec (the property suite)")
    group.addoption(
        "--impl", action="append", default=None, metavar="FILE_OR_MODULE",
        help="implementation under test: a .py file (any path), an importable module, or a built-in name "
             "(ours, pytorch); repeatable. Default: ours, pytorch. Also read from "
             f"${IMPL_ENV} (comma-separated). Runs this suite's properties/ unless test paths are given.",
    )
    group.addoption(
        "--scorecard", default=None, metavar="PATH",
        help="also write the scorecard: Markdown if PATH ends in .md, JSON if .json, else both "
             "(PATH.md and PATH.json). It is printed at the end of every --impl run.",
    )
    group.addoption(
        "--call-timeout", type=float, default=DEFAULT_CALL_TIMEOUT, metavar="SECONDS",
        help=f"a call into the implementation that takes longer fails with 'did not return within N s' "
             f"(default {DEFAULT_CALL_TIMEOUT:g}; 0: no limit).",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Under --impl: collect this suite's properties/ (or the suite-relative test paths given), rooted at
    the suite, wherever pytest was started.

    pytest decides its rootdir and configuration file before it loads plugins, from a first reading of the
    command line in which ``--impl`` is not yet known: ``--impl /home/me/model.py`` then reads as a test
    path, and the run would be rooted (and collect) there. This runs after the plugins are loaded and the
    command line has been read again with ``--impl``: it names the test paths and roots the run again."""
    ns = early_config.known_args_namespace
    if not _targets(getattr(ns, "impl", None)):
        return
    given = [str(a) for a in (getattr(ns, "file_or_dir", None) or [])]
    if getattr(ns, "pyargs", False):
        return
    paths: list[Path] = []
    if not given:
        args.append(str(PROPERTIES_DIR))
        paths.append(PROPERTIES_DIR)
    else:
        invocation = early_config.invocation_params.dir
        for i, arg in enumerate(args):
            if arg not in given:
                continue
            base = arg.split("::", 1)[0]
            if not (invocation / base).exists() and (SUITE_ROOT / base).exists():
                args[i] = str(SUITE_ROOT / arg)  # "properties/test_sdpa.py::test_x" from anywhere
                paths.append(SUITE_ROOT / base)
            else:
                paths.append((invocation / base).resolve())
    if paths and all(p.resolve().is_relative_to(SUITE_ROOT) for p in paths):
        _reroot(early_config, paths, args)


def _reroot(config: pytest.Config, paths: list[Path], args: list[str]) -> None:
    """Root the run at the suite (rootdir, configuration file, conftest cut) as pytest would have, had it
    known that the path after --impl is the option's value. Best effort: private attributes of pytest's
    Config; without them the run still collects the right tests."""
    ns = config.known_args_namespace
    if getattr(ns, "rootdir", None) or getattr(ns, "inifilename", None):
        return  # the user chose
    try:
        import inspect

        from _pytest.config.findpaths import determine_setup

        wanted = inspect.signature(determine_setup).parameters
        kwargs: dict[str, Any] = dict(inifile=None, args=[str(p) for p in paths], rootdir_cmd_arg=None,
                                      invocation_dir=config.invocation_params.dir)
        if "override_ini" in wanted:
            kwargs["override_ini"] = getattr(ns, "override_ini", None)
        rootpath, inipath, inicfg = determine_setup(**{k: v for k, v in kwargs.items() if k in wanted})[:3]
        if rootpath == config.rootpath and inipath == config.inipath:
            return
        old_cut = {str(config.inipath.parent) if config.inipath else None, str(config.rootpath)}
        config._rootpath, config._inipath = rootpath, inipath
        if hasattr(config, "_inicfg"):
            config._inicfg = inicfg
        else:
            config.inicfg = inicfg
        config._inicache.clear()
        config._parser.extra_info["rootdir"] = str(rootpath)
        config._parser.extra_info["inifile"] = str(inipath)
        if ns.confcutdir in old_cut:
            ns.confcutdir = str(inipath.parent if inipath else rootpath)
        # pytest read no (or another) configuration file: apply the suite's addopts (--tb=short) now.
        args[:0] = [str(a) for a in config.getini("addopts")]
    except Exception:  # noqa: BLE001 (another pytest's internals: keep its own rooting)
        return


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Claim:
    """One property's verdict for one component of one implementation (all its parametrizations)."""

    impl: str
    component: str
    prop: str
    passed: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)
    failure: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return "failed" if self.failed else "held" if self.passed else "skipped"

    @property
    def skip_category(self) -> str:
        for category in ("not provided", "not offered", "no CUDA"):
            if self.skipped[category]:
                return category
        return "other"


@dataclass
class RunState:
    active: bool = False
    targets: list[str] = field(default_factory=list)
    worker: bool = False
    cuda_not_run: int = 0
    threads_before: set = field(default_factory=set)
    threads_left: list[str] = field(default_factory=list)
    foreign_threads: list[threading.Thread] = field(default_factory=list)
    claims: dict[tuple[str, str, str], Claim] = field(default_factory=dict)
    exitstatus: int = 0
    saved_run: Any = None
    # implementation label -> component -> the options it offers fewer values of than the spec draws
    narrowed: dict[str, dict[str, str]] = field(default_factory=dict)


STATE = pytest.StashKey[RunState]()


def _state(config: pytest.Config) -> RunState:
    return config.stash.get(STATE, None) or RunState()


def _is_suite_run(config: pytest.Config, targets: list[str]) -> bool:
    if targets or config.rootpath == SUITE_ROOT:
        return True
    return any(_own(str(a).split("::", 1)[0]) for a in config.args)


HYPOTHESIS_PROFILES_READY = False


def _hypothesis_profiles(*, learner_run: bool) -> None:
    """Profiles. Deadlines are off: torch's first call of an op (kernel selection, lazy init, CUDA context)
    takes far longer than the rest, and a deadline would flag warm-up, not the implementation. too_slow
    stays on: our strategies draw small shapes, so a slow draw is a real problem. One failure per property
    (report_multiple_bugs=False) and no "explain" phase keep a report short: the claim, the shrunk
    configuration, the error and the hint.

    Two defaults, both derandomized (the same examples every run: a red run is never a coin toss):
    ``impl`` (20 examples) for ``--impl`` runs, and ``ci`` (10 examples) for the suite's own run on ours and
    PyTorch's modules. The suite's own run is a regression guard over code that has passed the ``thorough``
    profile (400 examples a property), and what each property can catch is shown by the mutant catalog,
    which runs every property at 50 examples (meta_tests/catalog.py); a learner's code has met neither,
    so it gets twice the examples."""
    global HYPOTHESIS_PROFILES_READY
    from hypothesis import Phase, settings

    if not HYPOTHESIS_PROFILES_READY:
        quiet = dict(deadline=None, print_blob=True, report_multiple_bugs=False,
                     phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
        settings.register_profile("fast", max_examples=5, **quiet)
        settings.register_profile("ci", max_examples=10, derandomize=True, database=None, **quiet)
        settings.register_profile("impl", max_examples=20, derandomize=True, database=None, **quiet)
        settings.register_profile("thorough", max_examples=400, **quiet)
        HYPOTHESIS_PROFILES_READY = True
    # Health checks stay on in every profile: strategies build valid inputs instead of filtering them.
    # (Hypothesis' own plugin loads --hypothesis-profile after this.)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "impl" if learner_run else "ci"))


def _remember_test_digests() -> None:
    """Hypothesis hashes a test's cleaned source twice per run (inspect.getsource, ast and tokenize: ~2 ms
    each), for the derandomized seed and the example-database key, and never remembers the result. This
    suite runs about two thousand tests and mutant runs per session, so it remembers the digest per
    function and parametrization (the only inputs besides the source, which does not change within a
    process). The seeds and keys are the ones Hypothesis computes; only the repeats are skipped. A private
    name of Hypothesis: if a release renames it, nothing is patched and nothing else changes."""
    from hypothesis import core

    original = getattr(core, "function_digest", None)
    if original is None or getattr(original, "remembered", False):
        return
    import weakref

    # function -> {parametrization digest: digest}; weak, so a test defined on the fly (a meta test's
    # closure) is not kept alive by its entry.
    digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def function_digest(function: Any) -> bytes:
        try:
            known = digests.setdefault(function, {})
        except TypeError:  # not weakly referenceable
            return original(function)
        added = getattr(function, "_hypothesis_internal_add_digest", None)
        if added not in known:
            known[added] = original(function)
        return known[added]

    function_digest.remembered = True
    core.function_digest = function_digest


MARKERS = (
    "requires(*components): the spec components a property needs from the implementation under test",
    "needs(*components, **options): option values a property needs the implementation to offer "
    "(properties/options.py)",
    "slow: learnability tests that train small models (still inside CI's time)",
    "distributed: starts a 2-process gloo group; deselected by default, its own CI step (pytest -m distributed)",
)


def _given_on_command_line(config: pytest.Config, *flags: str) -> bool:
    import shlex

    given = [str(a) for a in config.invocation_params.args] + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    return any(a == f or a.startswith(f + "=") or (len(f) == 2 and a.startswith(f) and not a.startswith("--"))
               for a in given for f in flags)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    targets = _targets(config.getoption("impl", None))
    state = RunState(active=_is_suite_run(config, targets), targets=targets,
                     worker=hasattr(config, "workerinput"))
    config.stash[STATE] = state
    if not state.active:
        return
    config.pluginmanager.register(SuiteRun(config, state), "transformer_spec_run")
    known = {line.split(":", 1)[0].split("(", 1)[0] for line in config.getini("markers")}
    for line in MARKERS:
        if line.split("(", 1)[0].split(":", 1)[0] not in known:
            config.addinivalue_line("markers", line)
    config.addinivalue_line("filterwarnings", "error::hypothesis.errors.NonInteractiveExampleWarning")
    _hypothesis_profiles(learner_run=bool(targets))
    _remember_test_digests()

    import torch

    from properties import call_probes
    from properties.plugin import DEFAULT_TARGETS, ImplementationLoadError, load_implementation

    try:
        config.implementations = [load_implementation(t) for t in (targets or DEFAULT_TARGETS)]
    except ImplementationLoadError as exc:
        raise pytest.UsageError(str(exc)) from None
    if targets:
        state.narrowed = {impl.label: narrowed_options(impl) for impl in config.implementations}
    # The suite's tensors are tiny: torch's intra-op threads cost far more than they save, and under
    # `pytest -n auto` every core already runs a worker (2 workers x 2 threads made a 1 ms forward 100x slower).
    torch.set_num_threads(1)
    # Exactness claims must not meet TF32 matmuls (off by default for matmul, on for cuDNN convolutions).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timeout = config.getoption("call_timeout", DEFAULT_CALL_TIMEOUT)
    state.saved_run = (call_probes.RUN.call_timeout, dict(call_probes.DEFECTS), dict(call_probes.PROBED))
    call_probes.RUN.call_timeout = timeout if timeout and timeout > 0 else None
    call_probes.DEFECTS.clear()
    call_probes.PROBED.clear()
    state.threads_before = set(threading.enumerate())
    if targets:
        # The scorecard is the report: every failed claim once, a shared cause once. pytest's traceback and
        # summary line per failed test would repeat each cause once per property (--tb=short brings them back).
        if not _given_on_command_line(config, "--tb"):
            config.option.tbstyle = "no"
        if not _given_on_command_line(config, "-r"):
            config.option.reportchars = "E"


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = _state(config)
    if not state.active:
        return []
    import torch
    from hypothesis import settings

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "not available (CUDA cases not run)"
    return [
        "implementations under test: " + ", ".join(i.label for i in config.implementations),
        f"hypothesis profile: {settings.get_current_profile_name()}; torch {torch.__version__}; CUDA: {cuda}",
    ]


# ---------------------------------------------------------------------------------------------------
# Collection


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _state(metafunc.config).active or not _own(metafunc.definition.path):
        return
    impls = metafunc.config.implementations
    if "impl" in metafunc.fixturenames:
        # Session scope: Hypothesis rejects function-scoped fixtures under @given.
        metafunc.parametrize("impl", impls, ids=[i.label for i in impls], scope="session")
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", "cuda"], scope="session")


def _components(item: pytest.Item, params: dict[str, Any]) -> list[str]:
    needed = [params["component"]] if isinstance(params.get("component"), str) else []
    for marker in item.iter_markers("requires"):
        needed.extend(marker.args)
    return needed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    if not state.active:
        return
    import torch

    from properties.options import unmet_needs

    low_precision = (torch.float16, torch.bfloat16)
    cuda = torch.cuda.is_available()
    kept, no_cuda = [], []
    for item in items:
        if not _own(item.path):
            kept.append(item)
            continue
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        device, dtype, impl = params.get("device"), params.get("dtype"), params.get("impl")
        if device == "cuda" and not cuda:
            no_cuda.append(item)  # one line in the summary, not hundreds of skips
            continue
        kept.append(item)
        needed = _components(item, params)
        if impl is not None:
            item.user_properties.append((SPEC_INFO, {
                "impl": impl.label, "component": needed[0] if needed else "(no component)",
                "property": getattr(item, "originalname", item.name),
            }))
        if device == "cpu" and dtype in low_precision:
            item.add_marker(pytest.mark.skip(reason=f"{dtype} is judged on CUDA only"))
            continue
        if impl is None:
            continue
        missing = [name for name in needed if not impl.provides(name)]
        if missing:
            item.add_marker(pytest.mark.skip(reason="; ".join(impl.missing_reason(n) for n in missing)))
            continue
        reason = unmet_needs(impl, needed, item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    if no_cuda:
        config.hook.pytest_deselected(items=no_cuda)
        items[:] = kept
        state.cuda_not_run = len(no_cuda)


# ---------------------------------------------------------------------------------------------------
# Reports: what each failure says, collected where the terminal is (the xdist controller)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test starts with no compute-precision declaration recorded (properties/precision.py): one
    declared float32 component must not relax the float64 checks of the tests after it."""
    if _own(item.path):
        from properties import precision

        precision.reset()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not (report.failed and call.excinfo is not None and _own(item.path) and _state(item.config).active):
        return report
    exc = call.excinfo.value
    info = {"type": type(exc).__name__, "message": str(exc),
            "notes": [str(n) for n in getattr(exc, "__notes__", []) or []]}
    if isinstance(exc, SystemExit):
        from properties.call_probes import location

        impl = getattr(getattr(item, "callspec", None), "params", {}).get("impl")
        where = location(exc)
        info["type"], info["message"] = "ComponentFailure", (
            f"{getattr(impl, 'label', 'the implementation')}: it called sys.exit({exc.code!r})"
            + (f" ({where})" if where else "") + ": a component must raise an exception (or return), never "
            "end the process")
        report.longrepr = info["message"] + "".join("\n" + n for n in info["notes"])
    report.user_properties.append((SPEC_FAILURE, info))
    return report


class SuiteRun:
    """The hooks of one run of the suite (registered at configure, so that each pytest run, nested ones
    included, keeps its own state): collecting reports, the end of the run, the scorecard."""

    def __init__(self, config: pytest.Config, state: RunState):
        self.config, self.state = config, state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        if state.worker or not (state.targets or self.config.getoption("scorecard", None)):
            return
        props = dict(report.user_properties)
        spec = props.get(SPEC_INFO)
        if spec is None:
            return
        key = (spec["impl"], spec["component"], spec["property"])
        claim = state.claims.get(key)
        if claim is None:
            claim = state.claims[key] = Claim(*key)
        if report.failed:
            claim.failed += 1
            # The first failing test in name order stands for the claim (xdist reports arrive in any order).
            if claim.failure is None or report.nodeid < claim.failure["test"]:
                claim.failure = dict(props.get(SPEC_FAILURE) or {"type": "Error", "message": _last_line(report), "notes": []})
                claim.failure["test"] = report.nodeid
        elif report.skipped and report.when in ("setup", "call"):
            claim.skipped[_skip_category(report)] += 1
        elif report.passed and report.when == "call":
            claim.passed += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config, state = self.config, self.state
        from properties.call_probes import describe_thread

        state.foreign_threads = _threads_left(state)
        state.threads_left += [describe_thread(t) for t in state.foreign_threads]
        if state.worker:
            config.workeroutput[SPEC_INFO] = {"cuda_not_run": state.cuda_not_run, "threads_left": state.threads_left}
            return
        if state.threads_left and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        state.exitstatus = int(session.exitstatus)
        path = config.getoption("scorecard", None)
        if path and state.claims:
            for target, text in _scorecard_files(Path(path), state):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: a worker's CUDA count and the threads the implementation left in it."""
        found = getattr(node, "workeroutput", {}).get(SPEC_INFO)
        if not found:
            return
        state = self.state
        state.cuda_not_run = max(state.cuda_not_run, found.get("cuda_not_run", 0))
        state.threads_left += [t for t in found.get("threads_left", []) if t not in state.threads_left]

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        state, tr = self.state, terminalreporter
        if state.worker:
            return
        if state.threads_left:
            tr.write_sep("=", "threads left running", red=True, bold=True)
            for t in state.threads_left:
                tr.write_line(f"the implementation left thread {t} running after the tests; pytest does not "
                              "wait for it (a component must not start threads that outlive its call, or must "
                              "make them daemon threads)")
        if state.targets and state.claims:
            for title, lines in render_text(state, width=getattr(tr._tw, "fullwidth", 100) - 1):
                tr.write_sep("=", title, bold=True)
                for line in lines:
                    tr.write_line(line)
        if state.cuda_not_run:
            tr.write_line(f"CUDA cases: {state.cuda_not_run} not run ({NO_CUDA})")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        state = self.state
        from properties import call_probes

        if state.saved_run is not None:
            call_probes.RUN.call_timeout, defects, probed = state.saved_run
            call_probes.DEFECTS.clear()
            call_probes.DEFECTS.update(defects)
            call_probes.PROBED.clear()
            call_probes.PROBED.update(probed)
        # A non-daemon thread the implementation started would keep this process alive after the run:
        # Python waits for every such thread before it exits. The run is over and reported: leave now.
        # An xdist worker has sent its results by now (and its controller would wait 10 s for it to exit).
        if ((state.worker or call_probes.main_process_is_pytest())
                and any(t.is_alive() for t in state.foreign_threads)):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(state.exitstatus)


def _threads_left(state: RunState) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t not in state.threads_before and t.is_alive() and not t.daemon and t is not threading.current_thread()]


def _last_line(report: pytest.TestReport) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"{report.when} failed"


def _skip_category(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if "is not provided by" in reason:
        return "not provided"
    if reason.startswith("needs "):
        return "not offered"
    if "CUDA" in reason:
        return "no CUDA"
    return "other"


# ---------------------------------------------------------------------------------------------------
# The scorecard


_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
_CALL = re.compile(r"\b([A-Za-z_]\w*)\((?:[^()]*=[^()]*)?\)")
_CALLED_WITH = re.compile(r"; it was called with \(.*$")


def _headline(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else ""


def cause_key(failure: dict[str, Any]) -> str:
    """Failures with the same key share a cause: the same sentence up to configuration and numbers."""
    text = _headline(failure["message"])
    if failure["type"] != "ComponentFailure":
        text = failure["message"].strip()
    text = _CALLED_WITH.sub("", text)
    text = _CALL.sub(lambda m: m.group(1) + "(...)", text)
    return failure["type"] + ": " + _NUMBER.sub("#", text)


def parse_failure(failure: dict[str, Any]) -> dict[str, str]:
    """claim, seen, hint (the suite's messages, properties/assertions.fail) and the shrunk configuration."""
    lines = [line.strip() for line in failure["message"].strip().splitlines() if line.strip()]
    out = {"claim": lines[0] if lines else "", "seen": "", "hint": ""}
    for line in lines[1:]:
        for key in ("seen", "hint"):
            if line.startswith(key + ":"):
                out[key] = line[len(key) + 1:].strip()
    if failure["type"] not in ("AssertionError", "ComponentFailure"):
        out["claim"] = f"{failure['type']}: {out['claim']}"
    out["configuration"] = shrunk_configuration(failure.get("notes", []))
    return out


def _split_arguments(body: str) -> list[str]:
    """Split 'a=1, b=f(2, 3), c=[4, 5]' at its top-level commas."""
    parts, depth, quote, current = [], 0, "", []
    for ch in body:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [" ".join(p.split()) for p in parts if p.strip()]


_NOT_SHOWN = ("impl=", "component=", "data=data(", "device='cpu'")


def shrunk_configuration(notes: list[str]) -> str:
    """The example Hypothesis shrank to, in one line: the test's arguments (not impl, component, the CPU)
    and each labelled draw."""
    text = "\n".join(notes)
    parts: list[str] = []
    call = re.search(r"(?:Falsifying example|Failing test case): \w+\(", text)
    if call:
        depth, end = 1, call.end()
        while end < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        parts += [a for a in _split_arguments(text[call.end():end - 1]) if not a.startswith(_NOT_SHOWN)]
    draw: list[str] | None = None
    for line in text.splitlines():
        found = re.match(r"Draw \d+(?: \(([^)]*)\))?: (.*)$", line)
        if found:
            draw = [f"{found.group(1)}={found.group(2)}" if found.group(1) else found.group(2)]
            parts.append(draw)  # type: ignore[arg-type]
        elif draw is not None and line.strip() and not line.startswith(("You can", "Falsifying", "Failing")):
            draw.append(line.strip())
        else:
            draw = None
    shown = "; ".join(" ".join(" ".join(p).split()) if isinstance(p, list) else p for p in parts)
    shown = shown.replace("( ", "(")
    return shown if len(shown) <= 240 else shown[:237] + "..."


def _summaries(state: RunState) -> list[dict[str, Any]]:
    """Per implementation: components with their counts, the failed claims and the causes they share."""
    from spec import COMPONENTS

    order = {name: i for i, name in enumerate(COMPONENTS)}
    ordered = sorted(state.claims.values(), key=lambda c: (order.get(c.component, len(order)), c.component, c.prop))
    out = []
    for label in dict.fromkeys(c.impl for c in ordered):
        claims = [c for c in ordered if c.impl == label]
        components: dict[str, dict[str, Any]] = {}
        for c in claims:
            row = components.setdefault(c.component, {"name": c.component, "held": 0, "failed": 0, "skipped": Counter()})
            if c.status == "skipped":
                row["skipped"][c.skip_category] += 1
            else:
                row[c.status] += 1
        failed = [c for c in claims if c.status == "failed"]
        groups: dict[str, list[Claim]] = {}
        for c in failed:
            groups.setdefault(cause_key(c.failure), []).append(c)
        shared = [g for g in groups.values() if len(g) > 1]
        single = [g[0] for g in groups.values() if len(g) == 1]
        out.append({
            "label": label,
            "totals": {s: sum(1 for c in claims if c.status == s) for s in ("held", "failed", "skipped")},
            "components": list(components.values()),
            "shared": shared,
            "single": single,
        })
    return out


def narrowed_options(impl) -> dict[str, str]:
    """Per component ``impl`` provides, the options it offers fewer values of than the spec draws (declared,
    or read from its signature), e.g. ``{"sequence_logprobs": "average_log_prob=False"}``. Its claims held
    in those configurations only, and the scorecard says so: a declaration narrows what is checked."""
    from spec import COMPONENTS

    out: dict[str, str] = {}
    for name, entry in COMPONENTS.items():
        if not impl.provides(name):
            continue
        offers = impl.offers(name)
        parts = [f"{opt.name}=" + "|".join(repr(v) for v in offers.values[opt.name])
                 for opt in entry.options
                 if opt.kind != "convention" and opt.name in offers.values
                 and len(offers.values[opt.name]) < len(opt.values)]
        if parts:
            out[name] = ", ".join(parts)
    return out


def _narrowing_lines(state: RunState, label: str, shown: list[dict[str, Any]], width: int) -> list[str]:
    narrowed = state.narrowed.get(label, {})
    rows = [(r["name"], narrowed[r["name"]]) for r in shown if r["name"] in narrowed and (r["held"] or r["failed"])]
    if not rows:
        return []
    lines = ["", "  checked only in the configurations offered (declared, or read from the signature):"]
    for name, text in rows:
        lines += _wrapped(text, "      ", width, first=f"    {name}: ")
    return lines


def _skipped_text(counter: Counter) -> str:
    return ", ".join(f"{n} {category}" for category, n in counter.most_common())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _totals(t: dict[str, int]) -> str:
    return f"{_plural(t['held'], 'claim')} held, {t['failed']} failed, {t['skipped']} skipped"


def _wrapped(text: str, indent: str, width: int, first: str | None = None) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(width, 60), initial_indent=first if first is not None else indent,
                         subsequent_indent=indent, break_on_hyphens=False, break_long_words=False) or [indent]


def _claims_list(group: list[Claim]) -> str:
    by_component: dict[str, list[str]] = {}
    for c in group:
        by_component.setdefault(c.component, []).append(c.prop)
    return "; ".join(f"{', '.join(props)} ({comp})" for comp, props in by_component.items())


def render_text(state: RunState, width: int = 100) -> list[tuple[str, list[str]]]:
    """The terminal scorecard: (title, lines) per implementation."""
    sections = []
    for s in _summaries(state):
        lines = [_totals(s["totals"]), ""]
        shown = [r for r in s["components"] if r["held"] or r["failed"] or set(r["skipped"]) - {"not provided"}]
        absent = [r for r in s["components"] if r not in shown]
        if shown:
            w = max([len("component")] + [len(r["name"]) for r in shown])
            lines.append(f"  {'component':<{w}}  {'held':>4}  {'failed':>6}  skipped")
            for r in shown:
                lines.append(f"  {r['name']:<{w}}  {r['held']:>4}  {r['failed'] or '-':>6}  "
                             f"{_skipped_text(r['skipped']) or '-'}")
        lines += _narrowing_lines(state, s["label"], shown, width)
        if absent:
            n = sum(sum(r["skipped"].values()) for r in absent)
            lines += _wrapped(", ".join(r["name"] for r in absent), "    ", width,
                              first=f"  not provided ({n} claims skipped): ")
        if s["shared"] or s["single"]:
            lines += ["", "failed claims:"]
        for group in sorted(s["shared"], key=len, reverse=True):
            first = parse_failure(group[0].failure)
            lines += _wrapped(first["claim"], "      ", width, first=f"  {len(group)} properties failed with: ")
            for key in ("seen", "hint"):
                if first[key]:
                    lines += _wrapped(first[key], "        ", width, first=f"      {key}: ")
            lines += _wrapped(_claims_list(group), "      ", width, first="      in: ")
        for c in s["single"]:
            f = parse_failure(c.failure)
            lines.append(f"  {c.component}: {c.prop}")
            lines += _wrapped(f["claim"], "      ", width)
            for key, name in (("seen", "seen"), ("hint", "hint"), ("configuration", "shrunk to")):
                if f[key]:
                    lines += _wrapped(f[key], "        ", width, first=f"      {name}: ")
        if s["shared"] or s["single"]:
            example = (s["single"] or s["shared"][0])[0]
            lines += ["", f"one claim with its traceback: pytest --impl {s['label']} -k {example.prop} --tb=short"]
        sections.append((f"scorecard: {s['label']}", lines))
    return sections


def render_markdown(state: RunState) -> str:
    out = []
    for s in _summaries(state):
        t = s["totals"]
        out += [f"# Scorecard: `{s['label']}`", "", _totals(t) + ".", "",
                "| component | held | failed | skipped |", "|---|---:|---:|---|"]
        absent = []
        for r in s["components"]:
            if r["held"] or r["failed"] or set(r["skipped"]) - {"not provided"}:
                out.append(f"| {r['name']} | {r['held']} | {r['failed']} | {_skipped_text(r['skipped'])} |")
            else:
                absent.append(r)
        narrowed = state.narrowed.get(s["label"], {})
        checked = [r["name"] for r in s["components"] if r["name"] in narrowed and (r["held"] or r["failed"])]
        if checked:
            out += ["", "Checked only in the configurations offered (declared, or read from the signature):", ""]
            out += [f"* {name}: `{narrowed[name]}`" for name in checked]
        if absent:
            n = sum(sum(r["skipped"].values()) for r in absent)
            out += ["", f"Not provided ({n} claims skipped): " + ", ".join(r["name"] for r in absent) + "."]
        if s["shared"] or s["single"]:
            out += ["", "## Failed claims", ""]
        for group in sorted(s["shared"], key=len, reverse=True):
            first = parse_failure(group[0].failure)
            out.append(f"* **{len(group)} properties failed with:** {first['claim']}")
            for key in ("seen", "hint"):
                if first[key]:
                    out.append(f"  * {key}: {first[key]}")
            out.append(f"  * {_claims_list(group)}")
        for c in s["single"]:
            f = parse_failure(c.failure)
            out.append(f"* **{c.component}: `{c.prop}`**: {f['claim']}")
            for key in ("seen", "hint", "configuration"):
                if f[key]:
                    out.append(f"  * {'shrunk to' if key == 'configuration' else key}: {f[key]}")
        out.append("")
    extra = _footer(state)
    return "\n".join(out + extra) + "\n"


def _footer(state: RunState) -> list[str]:
    out = []
    if state.threads_left:
        out.append("Threads left running by the implementation: " + ", ".join(state.threads_left))
    if state.cuda_not_run:
        out.append(f"CUDA cases: {state.cuda_not_run} not run ({NO_CUDA})")
    return out


def render_json(state: RunState) -> str:
    data = {"implementations": [], "cuda_cases_not_run": state.cuda_not_run, "threads_left_running": state.threads_left}
    for s in _summaries(state):
        claims = [c for c in state.claims.values() if c.impl == s["label"]]
        data["implementations"].append({
            "label": s["label"],
            "totals": s["totals"],
            "components": [{"name": r["name"], "held": r["held"], "failed": r["failed"], "skipped": dict(r["skipped"]),
                            **({"checked_only_with": state.narrowed[s["label"]][r["name"]]}
                               if r["name"] in state.narrowed.get(s["label"], {}) else {})}
                           for r in s["components"]],
            "claims": [
                {"component": c.component, "property": c.prop, "status": c.status,
                 **({"skipped": c.skip_category} if c.status == "skipped" else {}),
                 **({**parse_failure(c.failure), "test": c.failure.get("test", "")} if c.status == "failed" else {})}
                for c in claims
            ],
            "shared_causes": [
                {"message": parse_failure(g[0].failure)["claim"], "claims": [[c.component, c.prop] for c in g]}
                for g in s["shared"]
            ],
        })
    return json.dumps(data, indent=2) + "\n"


def _scorecard_files(path: Path, state: RunState) -> list[tuple[Path, str]]:
    if path.suffix == ".md":
        return [(path, render_markdown(state))]
    if path.suffix == ".json":
        return [(path, render_json(state))]
    return [(path.with_name(path.name + ".md"), render_markdown(state)),
            (path.with_name(path.name + ".json"), render_json(state))]
