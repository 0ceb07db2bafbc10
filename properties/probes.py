"""Probes shared by the properties: Jacobian blocks, gradchecks, the torch reference backend, and memory
(the tensors a call creates, the bytes autograd saves for backward)."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError
from torch.overrides import TorchFunctionMode

import pytest

from properties import precision
from properties.assertions import fail
from properties.plugin import ComponentFailure


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, who: object) -> Tensor:
    """d fn(x) / d x as a tensor of shape (*out.shape, *x.shape); autograd errors become failures."""
    try:
        return torch.autograd.functional.jacobian(fn, x)
    except ComponentFailure:
        raise
    except RuntimeError as exc:
        raise ComponentFailure(f"{who}: differentiating it raised RuntimeError: {exc}") from None


def gradcheck(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], *, claim: str, hint: str) -> None:
    """float64 ``torch.autograd.gradcheck``: analytic gradients equal finite differences."""
    __tracebackhide__ = True
    inputs = tuple(i.detach().clone().requires_grad_(i.is_floating_point()) for i in inputs)
    fn(*inputs)  # a first call records a declared compute precision (properties/precision.py)
    if precision.declared_owner():
        # Finite differences with eps 1e-6 on a float32 computation measure its rounding (1e-7 / 1e-6),
        # not its gradient: gradcheck cannot judge it, so say so instead of failing correct code.
        pytest.skip(f"gradcheck needs float64 compute; {precision.declared_owner()} declares compute_dtype=float32")
    try:
        # fast_mode checks a random projection u^T J v of the Jacobian against finite differences: one
        # backward pass instead of one per output, and a wrong gradient still shows almost surely.
        ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True, fast_mode=True)
    except ComponentFailure:
        raise
    except GradcheckError as exc:
        first = str(exc).strip().splitlines()[0]
        fail(claim, f"gradcheck: {first}", hint)
    except RuntimeError as exc:
        text = str(exc).splitlines()[0]
        more = (
            " An in-place operation overwrote a tensor autograd saved: use the out-of-place form (masked_fill)."
            if "inplace" in text
            else ""
        )
        fail(claim, f"backward raised RuntimeError: {text}.{more}", hint)
    else:
        assert ok


@contextlib.contextmanager
def math_backend() -> Iterator[None]:
    """Force PyTorch's reference (math) SDPA backend, which runs float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def torch_has_enable_gqa() -> bool:
    return "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def expect_value_error(call: Callable[[], object], *, claim: str, hint: str, what: str = "it returned") -> ValueError:
    """Run ``call`` (on the raw component: the suite's wrapper would turn the error into a failure) and
    require a ValueError; return it so the property can check its message."""
    __tracebackhide__ = True
    try:
        result = call()
    except ValueError as exc:
        return exc
    except Exception as exc:
        fail(claim, f"it raised {type(exc).__name__}: {exc}, not ValueError", hint)
    shown = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
    fail(claim, f"{what} {shown} instead of raising", hint)
    raise AssertionError("unreachable")


def assert_parameters_get_finite_gradients(
    params: dict[str, Tensor] | object, *, claim: str, hint: str, nonzero: str = "matrices"
) -> None:
    """After a backward pass: every parameter has a finite gradient, and a nonzero one for every matrix
    (``nonzero="matrices"``) or for every parameter (``"all"``).

    ``params`` is a dict of parameters (their ``.grad`` is read) or a CheckedModule, whose canonical
    parameters' gradients are read through its real parameters (``parameter_gradients``): a view handed
    out by ``canonical_state_dict()`` (a slice of a fused weight) has no ``.grad`` of its own.

    "matrices" is the rule for anything with attention: the key bias adds q.b_k to every score of a row,
    which softmax cancels, so its exact gradient is zero; that is a fact, not a bug.
    """
    __tracebackhide__ = True
    if hasattr(params, "parameter_gradients"):
        state = params.canonical_state()
        grads = params.parameter_gradients()
        shapes = {name: state[name].dim() for name in grads}
    else:
        grads = {name: p.grad for name, p in params.items()}
        shapes = {name: p.dim() for name, p in params.items()}
    problems = []
    for name, grad in grads.items():
        if grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif (nonzero == "all" or shapes[name] >= 2) and not bool((grad != 0).any()):
            problems.append(f"{name}: zero gradient")
    if problems:
        fail(claim, "; ".join(problems), hint)


# ---------------------------------------------------------------------------------------------------
# Memory: what a call creates and what autograd saves for backward


def saved_for_backward(run: Callable[[], Any], *, exclude: Iterable[Tensor] = ()) -> tuple[Any, dict[int, int]]:
    """``run()`` under a saved-tensors hook: (its result, {storage address: bytes}) for every tensor autograd
    saves for backward whose storage is not one of ``exclude``'s (parameters, inputs). A storage counts
    once and whole: a saved view keeps all of its base alive."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return run(), saved


def _tensors(value: Any):
    """The tensors in an operation's arguments or results (tensors, tuples and lists of them, dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class CreatedTensors(TorchFunctionMode):
    """Watches every torch function called: the largest tensor one creates (a result that is neither a view
    nor an in-place result of an argument: its storage is new) and, with ``live=True``, the bytes of created
    tensors alive at once (their storages' lifetimes, by weakref) and their peak. Python-level calls only:
    a torch.autograd.Function's backward is seen (``watching_backward``), autograd's C++ formulas are not.
    A TorchFunctionMode, not a TorchDispatchMode: entering the latter imports torch._dynamo (seconds of CPU).
    """

    def __init__(self, *, live: bool = False) -> None:
        super().__init__()
        self.largest: tuple[int, tuple[int, ...], str] = (0, (), "")
        self.live = self.peak = 0
        self._track = live
        self._alive: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {0} | {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() in inputs:
                continue
            if t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape), getattr(func, "__name__", str(func)))
            if self._track:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = storage.data_ptr()
        if key in self._alive:
            return
        self._alive.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)

        def freed(key=key, size=storage.nbytes()) -> None:
            self._alive.discard(key)
            self.live -= size

        weakref.finalize(storage, freed)

    @contextlib.contextmanager
    def watching_backward(self, out: Tensor) -> Iterator[CreatedTensors]:
        """Also watch the backward pass of ``out``'s graph: the autograd engine runs each node with no mode
        active, so every node's pre-hook enters this mode and its post-hook leaves it."""
        handles = []
        for node in _graph_nodes(out.grad_fn):
            handles.append(node.register_prehook(self._enter_node))
            handles.append(node.register_hook(self._leave_node))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter_node(self, grad_outputs) -> None:
        self.__enter__()

    def _leave_node(self, grad_inputs, grad_outputs) -> None:
        self.__exit__(None, None, None)


def _graph_nodes(root) -> Iterator[Any]:
    """Every autograd node reachable from ``root`` (a grad_fn), once each."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)
