"""What the call wrapper (properties/plugin.py, ``checked_call``) checks before any math is judged.

Bugs that are not about the math make the math properties fail in confusing ways: an input written in
place makes a scale look wrong, a module that keeps state between calls looks like a causal-mask leak,
random noise looks like a batch-axis bug. The wrapper names them instead, cheaply:

* **an input modified in place**: every tensor argument's version counter (bumped by every in-place
  operation on it or on a view of it) is compared before and after the call;
* **non-determinism and hidden state**: on the first call of a built module (or of a function handle),
  the component is called again: on a fresh input of the same shape, next to a copy of the module taken
  before its first call (a module whose output depends on earlier calls disagrees with the copy), and on
  the same input (an output that changes is random). Calls that carry a ``cache`` or a
  ``torch.Generator``, modules in training mode and inputs that require grad are exempt. These probes
  cost three calls and a copy, so each component is probed a couple of times per process
  (``RUN.probes_per_component``): the defect they look for is the component's, not the example's;
* **a call that does not return**: a watchdog (SIGALRM, main thread) stops a call after
  ``RUN.call_timeout`` seconds (``--call-timeout``, default 10);
* **``sys.exit``** inside a component is a failure of that component, not the end of the run;
* **where it went wrong**: errors name the innermost line in the implementation's own files, not the
  suite's wrapper or torch's internals.

Once a component has timed out or shown hidden state or randomness, every later call of it fails at once
with the same sentence: the run does not wait again, and the report groups one cause instead of blaming
every property.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class RunSettings:
    """Run-wide settings of the call wrapper; the pytest plugin sets them from its options."""

    call_timeout: float | None = 10.0  # seconds a single call may take; None or 0: no limit
    probes: bool = True  # the repeat probes (non-determinism, hidden state)
    probes_per_component: int = 2  # per implementation and component, in each process


RUN = RunSettings()

# (implementation label, component) -> a defect already shown. Later calls fail at once with it.
DEFECTS: dict[tuple[str, str], str] = {}
# (implementation label, component) -> repeat probes run so far.
PROBED: Counter[tuple[str, str]] = Counter()


class CallTimeout(BaseException):
    """Raised by the watchdog inside a component that did not return in time. A BaseException, so that an
    ``except Exception`` in the component does not swallow it."""


# ---------------------------------------------------------------------------------------------------
# Where an error happened: the implementation's own line


_ROOTS: list[str] = []  # directories (or files) holding implementations under test
_HARNESS = tuple(
    str(p) + "/" if p.is_dir() else str(p)
    for p in (
        Path(__file__).resolve().parent,  # properties/: the suite's own wrapper and properties
        Path(torch.__file__).resolve().parent,
        Path(np.__file__).resolve().parent,
        Path(contextlib.__file__).resolve().parent,  # the standard library
    )
)


def add_implementation_root(module: Any) -> None:
    """Remember where an implementation's code lives, so errors point into it."""
    paths = list(getattr(module, "__path__", []) or [])
    file = getattr(module, "__file__", None)
    if not paths and file:
        paths = [str(Path(file).resolve().parent)]
    for p in paths:
        root = str(Path(p).resolve()) + "/"
        if root not in _ROOTS and root not in _HARNESS:
            _ROOTS.append(root)


def _frames(tb: TracebackType | None) -> list[tuple[Any, int]]:
    out = []
    while tb is not None:
        out.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _resolved(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, RuntimeError):
        return filename


def _in_roots(filename: str) -> bool:
    return any(filename.startswith(r) for r in _ROOTS)


def _in_harness(filename: str) -> bool:
    return filename.startswith(_HARNESS) or "site-packages" in filename or filename.startswith("<")


def definition_of(obj: Any) -> str:
    """'MultiHeadAttention.__init__ is at model.py:19' for a class (its __init__), module (its forward) or
    function; '' where the source cannot be found."""
    if isinstance(obj, type):
        target, what = obj.__init__, f"{obj.__name__}.__init__"
    elif isinstance(obj, nn.Module):
        target, what = type(obj).forward, f"{type(obj).__name__}.forward"
    else:
        target, what = obj, getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    target = inspect.unwrap(getattr(target, "__func__", target))
    code = getattr(target, "__code__", None)
    if code is None:
        return ""
    filename = _resolved(code.co_filename)
    if _in_harness(filename) and not _in_roots(filename):
        return ""  # object.__init__, a torch module's forward: nothing of the learner's to point at
    return f"{what} is at {Path(filename).name}:{code.co_firstlineno}"


def location(exc: BaseException, callee: Any = None) -> str:
    """Where to look: 'at model.py:12 in forward', the innermost frame of ``exc`` in an implementation's
    files (else outside the suite, torch and the standard library). An error of the call itself (an
    unexpected keyword argument) has no such frame: then 'MultiHeadAttention.__init__ is at model.py:19',
    the definition of ``callee`` or of what the suite's wrapper was calling. '' if nothing is known."""
    frames = _frames(exc.__traceback__)
    if not frames:
        return ""
    named = [(f, line, _resolved(f.f_code.co_filename)) for f, line in frames]
    for test in (_in_roots, lambda name: not _in_harness(name)):
        for frame, line, name in reversed(named):
            if test(name):
                return f"at {Path(name).name}:{line} in {frame.f_code.co_name}"
    if callee is None:
        # The wrapper's frame names what it was calling: ``cls`` for a constructor, ``fn`` for a call.
        for frame, _, name in reversed(named):
            if name.startswith(_HARNESS[0]) and ("cls" in frame.f_locals or "fn" in frame.f_locals):
                callee = frame.f_locals.get("cls", frame.f_locals.get("fn"))
                break
    where = definition_of(callee) if callee is not None else ""
    if where:
        return where
    frame, line, name = named[-1]
    return f"at {Path(name).name}:{line} in {frame.f_code.co_name}"


# ---------------------------------------------------------------------------------------------------
# The watchdog


_armed = threading.local()


def _on_alarm(signum: int, frame: Any) -> None:
    if getattr(_armed, "on", False):
        _armed.on = False
        raise CallTimeout()


class watchdog:  # noqa: N801 (used as a context manager, like a function)
    """Raise CallTimeout inside the call if it runs longer than ``seconds`` (main thread, POSIX). Nested
    watchdogs, and an alarm someone else set (pytest-timeout's signal method), leave the outer one in charge."""

    __slots__ = ("seconds", "previous", "set")

    def __init__(self, seconds: float | None):
        self.seconds, self.previous, self.set = seconds, None, False

    def __enter__(self) -> None:
        if (not self.seconds or getattr(_armed, "on", False) or not hasattr(signal, "setitimer")
                or threading.current_thread() is not threading.main_thread()
                or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
            return
        self.previous = signal.signal(signal.SIGALRM, _on_alarm)
        self.set = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        _armed.on = True

    def __exit__(self, *exc: Any) -> None:
        if not self.set:
            return
        _armed.on = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        # None: the previous handler was not installed from Python; the default is the closest.
        signal.signal(signal.SIGALRM, signal.SIG_DFL if self.previous is None else self.previous)


def show_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


# ---------------------------------------------------------------------------------------------------
# Inputs modified in place


def snapshot(args: tuple, kwargs: dict[str, Any]) -> list[tuple[int | str, Tensor, int | Tensor]]:
    """(position or keyword, the argument, its version counter) for every tensor argument: every in-place
    operation on a tensor (or on a view of it) bumps the counter, so comparing it after the call costs
    nothing. A tensor without a counter (inference mode) is copied and compared instead."""
    out = []
    for key, value in (*enumerate(args), *kwargs.items()):
        if isinstance(value, Tensor):
            try:
                out.append((key, value, value._version))
            except RuntimeError:
                out.append((key, value, value.detach().clone()))
    return out


_SIGNATURES: dict[Any, list[str]] = {}


def argument_name(fn: Callable, key: int | str) -> str:
    if isinstance(key, str):
        return key
    target = type(fn).forward if isinstance(fn, nn.Module) else fn
    if target not in _SIGNATURES:
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            params = []
        if params and isinstance(fn, nn.Module) and params[0].name == "self":
            params = params[1:]
        _SIGNATURES[target] = [p.name for p in params
                               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = _SIGNATURES[target]
    return names[key] if key < len(names) else f"argument {key + 1}"


def modified_inputs(fn: Callable, before: list[tuple[int | str, Tensor, int | Tensor]]) -> str | None:
    """A sentence naming the first tensor argument the call wrote to, or None."""
    for key, value, seen in before:
        if isinstance(seen, int):
            written = value._version != seen
        else:
            written = value.shape != seen.shape or _changed_entries(value.detach(), seen) > 0
        if written:
            return (f"modified its input `{argument_name(fn, key)}` in place (an in-place operation wrote to the "
                    "caller's tensor or a view of it). The spec's components never write to their inputs: use "
                    "out-of-place operations (x = x - m, not x -= m, x.sub_(m) or x[...] = ...)")
    return None


def _changed_entries(a: Tensor, b: Tensor) -> int:
    if torch.equal(a, b):
        return 0
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same = same | (torch.isnan(a) & torch.isnan(b))
    return int((~same).sum())


# ---------------------------------------------------------------------------------------------------
# Non-determinism and hidden state


PROBE_SEED = 20240917


def take_probe(label: str, component: str, fn: Callable, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Should this first call be probed? (not exempt, and the component's probes are not used up)"""
    key = (label, component)
    if not RUN.probes or PROBED[key] >= RUN.probes_per_component or exempt(fn, args, kwargs):
        return False
    PROBED[key] += 1
    return True


def exempt(fn: Callable, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Calls that are stateful or random by design, or that the probes cannot repeat safely."""
    if kwargs.get("cache") is not None:
        return True
    values = (*args, *kwargs.values())
    if any(isinstance(v, torch.Generator) for v in values):
        return True
    if isinstance(fn, nn.Module) and fn.training:
        return True
    tensors = [v for v in values if isinstance(v, Tensor)]
    return not tensors or any(t.requires_grad for t in tensors)


def pristine_copy(fn: Callable) -> Callable | None:
    """A copy of a module taken before its first call (None where it cannot be copied)."""
    if not isinstance(fn, nn.Module):
        return None
    try:
        return copy.deepcopy(fn)
    except Exception:  # noqa: BLE001 (a module holding a lock or a file cannot be copied: no state probe)
        return None


@contextlib.contextmanager
def same_random_numbers(tensors: list[Tensor]) -> Iterator[None]:
    """Run with torch's, numpy's and Python's random generators seeded alike, and restore them after."""
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(PROBE_SEED)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(PROBE_SEED)
            random.seed(PROBE_SEED)
            np.random.seed(PROBE_SEED % 2**32)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def fresh_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Inputs of the same shapes with other values: floating tensors redrawn, integer tensors (tokens,
    positions) rotated, boolean masks and everything else kept."""
    gen = torch.Generator().manual_seed(PROBE_SEED)

    def fresh(a: Any) -> Any:
        if not isinstance(a, Tensor) or not a.numel() or a.dtype == torch.bool or a.is_complex():
            return a
        if a.is_floating_point():
            return torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype=a.dtype, device=a.device)
        return a.reshape(-1).roll(1).reshape(a.shape)

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


def difference(a: Any, b: Any) -> float | None:
    """None if two outputs agree (bit for bit on the CPU; within a few units in the last place on CUDA,
    whose kernels may sum in another order), else their largest difference (inf: not comparable)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return None
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf
    if torch.equal(a, b):
        return None
    if not a.is_floating_point():
        return math.inf
    a64, b64 = a.detach().double(), b.detach().double()
    diff = torch.where((a64 == b64) | (a64.isnan() & b64.isnan()), 0.0, (a64 - b64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    largest = diff.max().item()
    if a.is_cuda:
        scale = max(1.0, torch.nan_to_num(a64.abs(), nan=0.0, posinf=0.0).max().item())
        if largest <= 16 * torch.finfo(a.dtype).eps * scale:
            return None
    return largest or None


def repeat_probe(fn: Callable, pristine: Callable | None, args: tuple, kwargs: dict[str, Any], out: Tensor,
                 invoke: Callable[[Callable, tuple, dict[str, Any]], Any], key: tuple[str, str] | None = None,
                 ) -> str | None:
    """Call the component again (``invoke`` wraps each call like the first) and return a sentence naming
    hidden state or randomness, or None. ``pristine`` is a copy of the module taken before its first call.
    A probe that could not have shown hidden state (the fresh input gave the same output: a LayerNorm of
    width 1 returns its bias) is given back to ``key``'s budget."""
    # The same grad mode as the first call: torch picks other kernels under no_grad (nn.MultiheadAttention's
    # fast path), whose last bits differ, and that is no fault of the implementation.
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
    if pristine is not None:
        fresh_args, fresh_kwargs = fresh_inputs(args, kwargs)
        with same_random_numbers(tensors):
            again = invoke(fn, fresh_args, fresh_kwargs)
        with same_random_numbers(tensors):
            first = invoke(pristine, fresh_args, fresh_kwargs)
        gap = difference(again, first)
        if gap is not None:
            if difference(again, out) is None and difference(first, out) is not None:
                return ("returned its previous output for a new input of the same shape: it keeps state "
                        "between calls (a result cached on self?). The output must be computed from "
                        "each call's input alone")
            return (f"gives a fresh input another output than a copy of it built before its first call "
                    f"does (largest difference {gap:.3g}): its output depends on earlier calls (state "
                    "kept between calls). The output must be computed from each call's input alone")
        if key is not None and (not isinstance(first, Tensor) or difference(first, out) is None):
            PROBED[key] -= 1
        with same_random_numbers(tensors):
            repeat = invoke(fn, args, kwargs)
        gap = difference(repeat, out)
        return _random(gap) if gap is not None else None
    with same_random_numbers(tensors):
        one = invoke(fn, args, kwargs)
    with same_random_numbers(tensors):
        two = invoke(fn, args, kwargs)
    gap = difference(one, two)
    if gap is not None:
        return (f"returned different outputs for the same input on two calls with the same random seed "
                f"(largest difference {gap:.3g}): it keeps state between calls, or draws random numbers "
                "(time, os.urandom, its own generator). The output must be a function of the input")
    gap = difference(one, out)
    return _random(gap) if gap is not None else None


def _random(gap: float) -> str:
    return (f"is not deterministic: two calls on the same input returned different outputs (largest "
            f"difference {gap:.3g}); with torch's random seed fixed they agree, so it draws random numbers "
            "(noise, F.dropout with training=True, torch.rand*). Outside training the output must be a "
            "function of the input")


# ---------------------------------------------------------------------------------------------------
# Threads the implementation leaves running


def describe_thread(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None) or getattr(type(thread), "run", None)
    where = definition_of(target) if target is not None else ""
    return f"{thread.name!r}" + (f" (its function {where})" if where else "")


def main_process_is_pytest() -> bool:
    """True when this process is a pytest command (``pytest`` or ``python -m pytest``), not a program that
    called pytest.main() and must keep running."""
    argv0 = Path(sys.argv[0] if sys.argv else "")
    return argv0.name in ("pytest", "py.test", "pytest.exe") or (argv0.name == "__main__.py" and argv0.parent.name == "pytest")

