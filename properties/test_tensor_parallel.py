"""Properties of tensor parallelism: every rank's part equals the unsharded module, forward and backward.
Spec: spec/tensor_parallel.py.

How the ranks run
-----------------
A property draws one configuration per example, in this (pytest's) process, as every other property does;
the example is computed by tp = 2 worker processes joined in a gloo process group on 127.0.0.1, and judged
here. The workers are forked from this process the first time an implementation needs them (fork copies
the implementation under test, a learner's file or a mutant included, so nothing is pickled or imported
again; spawn would cost ~2 s of imports per group against ~0.1 s) and then serve every example of every
property for that implementation: the per-example cost is a round trip, so the properties keep the usual
20 examples and shrink as usual. Each example sends the configuration (sizes, options, a seed) to both
ranks; each rank builds its module with ``impl.build`` from the same canonical weights (drawn from the
seed: the unsharded module's, cut to its shard by ``spec.shard`` or, with ``full_state``, by the module's
own ``load_full_state_dict``), runs forward and backward on inputs drawn from the seed, and sends back its
output, its input gradient, its shards and their gradients as float64 numpy arrays. Here they are compared
with the unsharded module: the spec's float64 reference for the output, autograd through our unsharded
module (held to that reference by test_feed_forward.py and test_attention.py) for the gradients.

A rank that raises reports the error in the implementation's words, a rank whose process ends is named,
and the group is replaced (after a failure the ranks may be out of step). A rank that does not answer
within the call timeout (``--call-timeout``, default 10 s: a collective waiting for a partner that never
comes) fails the example with that sentence instead of blocking the run, the workers are killed, and
later examples of that component fail at once, as the suite does for any call that hangs. The calls made
inside the workers skip the wrapper's repeat and ignored-option probes: those call the module again, and
a probe whose outcome differs between ranks would leave one rank in a collective alone.

Each example is an ordinary Hypothesis example (drawn, shrunk and replayed here), so a failure shrinks to
the smallest configuration as everywhere else; only its computation happens in the two workers.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties import call_probes, precision
from properties.assertions import assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import ComponentFailure, Implementation, backward, call_arguments, checked_call, draw_parameters
from properties.probes import expect_value_error
from properties.strategies import fewer_examples, seeds, tensor
from spec import COMPONENTS
from spec import tensor_parallel as spec
from spec.tensor_parallel import TENSOR_PARALLEL_MODULES

WORLD_SIZE = 2
# The properties that start processes (~3 s for ours and ~3 s for this family's mutants on the 2-core CI
# machine) exceed the main suite's budget: they run as their own CI step, `pytest -m distributed`. The size
# check needs no process group and stays in the main suite.
DISTRIBUTED = pytest.mark.distributed
OURS = Implementation("ours", implementations)  # the unsharded modules the gradients are judged against
LINEARS = ("ColumnParallelLinear", "RowParallelLinear")
START_TIMEOUT = 30.0  # seconds for forking the workers and joining them in a process group
GRACE = 0.25  # seconds the other ranks may take to answer after one failed (a crash shows as an EOF at once)
GLOO_DEFAULT_TIMEOUT = 1800.0  # gloo's own, for --call-timeout 0 (no limit)


# ---------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class TPCase:
    """One configuration of a tensor-parallel module, its input sizes and seed. ``config`` holds the
    unsharded module's constructor keywords (world_size and rank are added per rank)."""

    component: str
    config: dict[str, Any]
    b: int
    s: int
    seed: int
    causal: bool = False
    full_state: bool = True

    @property
    def in_width(self) -> int:
        return self.config.get("in_features", self.config.get("d_model"))

    @property
    def out_width(self) -> int:
        return self.config.get("out_features", self.config.get("d_model"))

    def __repr__(self) -> str:
        keywords = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        call = f", causal={self.causal}" if self.component == "TensorParallelAttention" else ""
        loading = "load_full_state_dict" if self.full_state else "the pinned shards loaded by the suite"
        return (f"{self.component}({keywords}) on {WORLD_SIZE} ranks, x (b, s)=({self.b}, {self.s}){call}, "
                f"weights from {loading}, seed={self.seed}")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def _readers(component: str) -> dict[str, Any]:
    names = {opt.name for opt in COMPONENTS[component].options}
    readers = {"full_state": lambda case: case.full_state, "causal": lambda case: case.causal,
               "bias": lambda case: case.config["bias"], "activation": lambda case: case.config["activation"]}
    return {name: reader for name, reader in readers.items() if name in names}


def _register_for_every_component(strategy):
    for name in TENSOR_PARALLEL_MODULES:
        strategy = draws_options(name, **_readers(name))(strategy)
    return strategy


@_register_for_every_component
@st.composite
def tp_cases(draw, offers: Offers, *, full_state: bool | None = None):
    """A configuration of the offers' component whose split sizes tp divides: hidden widths 2 .. 6, heads
    h = g r with g in {2, 4} KV heads (one or two per rank) and r in {1, 2} query heads per KV head, head
    width 1 .. 2; batch 1 .. 2 and 1 .. 3 positions. Options come from the offers; ``full_state`` True fixes
    that option (the property then ``needs`` it)."""
    name = offers.component
    tp = WORLD_SIZE
    config: dict[str, Any]
    if name == "ColumnParallelLinear":
        config = {"in_features": draw(st.integers(1, 4), label="i"),
                  "out_features": tp * draw(st.integers(1, 3), label="o/tp")}
    elif name == "RowParallelLinear":
        config = {"in_features": tp * draw(st.integers(1, 3), label="i/tp"),
                  "out_features": draw(st.integers(1, 4), label="o")}
    elif name == "TensorParallelAttention":
        g = tp * draw(st.integers(1, 2), label="g/tp")
        h = g * draw(st.integers(1, 2), label="h/g")
        config = {"d_model": h * draw(st.integers(1, 2), label="e"), "n_head": h, "n_kv_head": g}
    else:
        config = {"d_model": draw(st.integers(1, 4), label="d"), "d_ff": tp * draw(st.integers(1, 3), label="f/tp")}
    if name == "TensorParallelFeedForward":
        config["activation"] = draw(offers.strategy("activation"), label="activation")
    if "bias" in offers.values:
        config["bias"] = draw(offers.strategy("bias"), label="bias")
    causal = draw(offers.strategy("causal"), label="causal") if "causal" in offers.values else False
    if full_state is None:
        full_state = draw(offers.strategy("full_state"), label="full_state")
    return TPCase(name, config, b=draw(st.integers(1, 2), label="b"), s=draw(st.integers(1, 3), label="s"),
                  seed=draw(seeds(), label="seed"), causal=causal, full_state=full_state)


# ---------------------------------------------------------------------------------------------------
# What a rank computes (in the worker processes)


def full_weights(case: TPCase) -> dict[str, torch.Tensor]:
    """The unsharded module's canonical parameters, drawn from the case's seed (float64)."""
    return draw_parameters(spec.full_parameters(case.component, **case.config), case.seed)


def unsharded_input(case: TPCase) -> torch.Tensor:
    return tensor(case.seed + 1, case.b, case.s, case.in_width, dtype=torch.float64, device="cpu")


def upstream_gradient(case: TPCase) -> torch.Tensor:
    """dL/d(unsharded output): the loss is sum(output * this), a random linear function of the output."""
    return tensor(case.seed + 2, case.b, case.s, case.out_width, dtype=torch.float64, device="cpu")


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy().copy()


def run_rank(impl: Implementation, case: TPCase, rank: int, parts: str) -> dict[str, Any]:
    """Build rank ``rank``'s module from the case's weights and return, by ``parts``, what it computed:
    the shards it holds ("shards"), its output ("forward"), or its input and shard gradients ("backward")."""
    tp = WORLD_SIZE
    full = full_weights(case)
    keywords = {**case.config, "world_size": tp, "rank": rank}
    if case.full_state:
        module = impl.build(case.component, seed=case.seed + 3, **keywords)  # its own weights, replaced next
        if not hasattr(module.module, "load_full_state_dict"):
            raise ComponentFailure(
                f"{impl.label}: {module.call} has no method load_full_state_dict(state), which loads the unsharded "
                "module's weights and keeps this rank's shard. Without one, declare spec_options = "
                "{'full_state': False}: the suite then loads the pinned shards itself")
        module.method("load_full_state_dict", {k: v.clone() for k, v in full.items()})
    else:
        shards = spec.shard(case.component, {k: v.numpy() for k, v in full.items()}, rank=rank, world_size=tp)
        module = impl.build(case.component, seed=case.seed, params={k: torch.from_numpy(v) for k, v in shards.items()},
                            **keywords)
    if parts == "shards":
        return {"held": {k: _numpy(v) for k, v in module.canonical_state().items()}}
    x = torch.from_numpy(spec.rank_input(case.component, unsharded_input(case).numpy(), rank=rank, world_size=tp))
    x = x.clone().requires_grad_(parts == "backward")
    kwargs = call_arguments(module.offers, {"causal": case.causal} if "causal" in module.offers.values else {})
    out = checked_call(module.entry, module.module, module.label, module.call, (x,), kwargs)
    upstream = torch.from_numpy(spec.rank_output(case.component, upstream_gradient(case).numpy(), rank=rank,
                                                 world_size=tp))
    if out.shape != upstream.shape:
        raise ComponentFailure(f"{impl.label}: {module.call} returned shape {tuple(out.shape)} on rank {rank}, but "
                               f"the spec says {tuple(upstream.shape)} for x of shape {tuple(x.shape)}")
    if parts == "forward":
        return {"out": _numpy(out)}
    backward((out * upstream).sum(), module)
    return {"x_grad": _numpy(x.grad), "grads": {k: _numpy(v) for k, v in module.parameter_gradients().items()}}


def _serve(impl: Implementation, rank: int, port: int, conn, timeout: float) -> None:
    """A worker: join the process group, then run every case the parent sends until it sends None."""
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=WORLD_SIZE, timeout=timedelta(seconds=timeout))
        conn.send(("ready", None))
        while (job := conn.recv()) is not None:
            case, parts = job
            try:
                conn.send(("ok", run_rank(impl, case, rank, parts)))
            except ComponentFailure as exc:
                conn.send(("failure", str(exc)))
            except BaseException as exc:  # noqa: BLE001 (a suite bug: report it with its traceback)
                conn.send(("error", "".join(traceback.format_exception(exc))))
    except BaseException as exc:  # noqa: BLE001 (the parent reads it, or sees the pipe close)
        try:
            conn.send(("error", "".join(traceback.format_exception(exc))))
        except Exception:  # noqa: BLE001
            pass
    finally:
        os._exit(0)  # never run the parent's atexit handlers or pytest's teardown in a forked child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """WORLD_SIZE forked workers joined in one gloo process group, serving cases for one implementation."""

    def __init__(self, impl: Implementation, component: str, timeout: float | None) -> None:
        self.impl, self.component, self.timeout = impl, component, timeout  # component: the one running now
        context = multiprocessing.get_context("fork")
        port = free_port()
        self.conns, self.processes = [], []
        for rank in range(WORLD_SIZE):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(impl, rank, port, theirs, timeout or GLOO_DEFAULT_TIMEOUT),
                                      daemon=True, name=f"tensor-parallel rank {rank}")
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)
        self._gather(START_TIMEOUT, "joining the gloo process group")

    def submit(self, case: TPCase, parts: str) -> None:
        for conn in self.conns:
            conn.send((case, parts))

    def results(self, case: TPCase) -> list[dict[str, Any]]:
        return self._gather(self.timeout, f"running {case!r}")

    def _gather(self, timeout: float | None, doing: str) -> list[Any]:
        """Every rank's answer. After a rank fails, the others get GRACE seconds to answer (one may wait in a
        collective for the rank that failed: it is not waited for), then the workers are stopped: a group
        that saw a failure may be out of step, so the next example starts a fresh one."""
        __tracebackhide__ = True
        results: list[Any] = [None] * WORLD_SIZE
        pending = dict(enumerate(self.conns))
        deadline = None if timeout is None else time.monotonic() + timeout
        failures: list[tuple[int, str, str]] = []
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending.values()), timeout=left)
            if not ready and not failures:
                self.close(stuck=True)
                call_probes.DEFECTS[(self.impl.label, self.component)] = (
                    f"did not finish {doing} within {call_probes.show_seconds(timeout)} on rank(s) {sorted(pending)} "
                    f"of {WORLD_SIZE}: a collective waits for a partner that never comes (one rank skipped or added "
                    "an all_reduce); later calls of it are not attempted")
                known_defect(self.impl, self.component)
            if not ready:
                break
            for conn in ready:
                rank = self.conns.index(conn)
                del pending[rank]
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):
                    status, payload = "ended", (f"{self.impl.label}: the process of rank {rank} ended while {doing} "
                                                "(a crash, or the component ended the process)")
                if status in ("ok", "ready"):
                    results[rank] = payload
                else:
                    failures.append((rank, status, payload))
                    deadline = min(deadline or math.inf, time.monotonic() + GRACE)
        if not failures:
            return results
        self.close(stuck=True)
        # The first cause: a rank that ended or raised by itself, not its partner's broken collective after it.
        rank, status, payload = min(failures, key=lambda f: ("ended", "error", "failure").index(f[1]))
        if status == "error":
            raise AssertionError(f"suite error on rank {rank} while {doing}:\n{payload}")
        raise ComponentFailure(payload if status == "ended" else f"{payload} [on rank {rank} of {WORLD_SIZE}]")

    def close(self, *, stuck: bool = False) -> None:
        """Stop the workers: ask them to exit, or kill them at once when one may wait in a collective."""
        for conn in self.conns if not stuck else ():
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=0 if stuck else 1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []


def known_defect(impl: Implementation, component: str) -> None:
    """Fail at once if the component hung before. Every such failure is raised from this one line, so that
    Hypothesis sees the same failure when it replays the example that first waited."""
    __tracebackhide__ = True
    known = call_probes.DEFECTS.get((impl.label, component))
    if known:
        raise ComponentFailure(f"{impl.label}: {component} {known}")


_GROUP: list[RankGroup] = []  # the one live group of this process (an implementation's workers)


def submit(impl: Implementation, case: TPCase, parts: str) -> Callable[[], list[dict[str, Any]]]:
    """Send ``case`` to the ranks of ``impl``'s live group (started when needed) and return the call that
    waits for their results, computed up to ``parts`` ("shards", "forward" or "backward"): the unsharded
    baseline is computed here meanwhile."""
    __tracebackhide__ = True
    known_defect(impl, case.component)
    if not _GROUP or _GROUP[0].impl is not impl or not _GROUP[0].conns:
        close_group()
        _GROUP.append(RankGroup(impl, case.component, call_probes.RUN.call_timeout))
    precision.record(impl.offers(case.component), None, (), {}, impl.label)  # a declared compute_dtype
    group = _GROUP[0]
    group.component = case.component
    group.submit(case, parts)
    return lambda: group.results(case)


@atexit.register
def close_group() -> None:
    """Stop the live group's workers (at exit, or when another implementation needs its own)."""
    while _GROUP:
        _GROUP.pop().close()


# ---------------------------------------------------------------------------------------------------
# The unsharded module (in this process)


def unsharded_reference(case: TPCase) -> np.ndarray:
    """The spec's float64 output of the unsharded module."""
    full = {k: v.numpy() for k, v in full_weights(case).items()}
    return spec.unsharded(case.component, full, unsharded_input(case).numpy(), causal=case.causal, **case.config)


def unsharded_gradients(case: TPCase) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(dL/dx, dL/d each canonical parameter) of the unsharded module, by autograd through ours."""
    full = full_weights(case)
    x = unsharded_input(case).requires_grad_()
    if case.component in LINEARS:
        params = {k: v.clone().requires_grad_() for k, v in full.items()}
        out = F.linear(x, params["weight"], params.get("bias"))
        grads = lambda: {k: p.grad for k, p in params.items()}
    else:
        module = OURS.build(spec.UNSHARDED[case.component][0], seed=case.seed, params=full, **case.config)
        out = module.module(x, causal=case.causal) if case.component == "TensorParallelAttention" else module.module(x)
        grads = module.parameter_gradients
    (out * upstream_gradient(case)).sum().backward()
    return x.grad.numpy(), {k: g.numpy() for k, g in grads().items()}


def _where(rank: int) -> str:
    return f"on rank {rank} of {WORLD_SIZE}"


# ---------------------------------------------------------------------------------------------------
# Properties


@DISTRIBUTED
@pytest.mark.parametrize("component", TENSOR_PARALLEL_MODULES)
@given(data=st.data())
def test_tensor_parallel_output_equals_the_unsharded_module(impl, component, data):
    """On every rank the output equals the unsharded module's on the same weights and input (float64):
    the whole output, all-reduced, or for ColumnParallelLinear the rank's contiguous slice of it.

    The usual causes: the row-parallel bias added before the all-reduce (counted tp times), no all-reduce
    (each rank returns its partial sum), a column-parallel slice and the row-parallel slice that reads it
    cut differently (interleaved against contiguous), fused [gate; up] or KV heads cut as one tensor.
    """
    case = data.draw(tp_cases(impl.offers(component)), label="case")
    results = submit(impl, case, "forward")
    expected = unsharded_reference(case)
    for rank, result in enumerate(results()):
        assert_close(
            torch.from_numpy(result["out"]),
            spec.rank_output(component, expected, rank=rank, world_size=WORLD_SIZE), axes="b s d",
            claim=f"{case}: the output {_where(rank)} equals the unsharded module's",
            hint="add the row-parallel bias once, after the all-reduce; all-reduce (sum) the row-parallel partial "
            "outputs; cut every weight in contiguous pieces, gate and up (q, k, v) one by one, never fused.",
        )


@DISTRIBUTED
@pytest.mark.parametrize("component", TENSOR_PARALLEL_MODULES)
@given(data=st.data())
def test_tensor_parallel_gradients_equal_the_unsharded_module(impl, component, data):
    """After backward, every rank's input gradient and the gradient of every shard it holds equal their
    part of the unsharded module's gradients (float64).

    The loss is sum(output * G), G random. The input gradient is the whole one (after the column-parallel
    all-reduce), or for RowParallelLinear the rank's slice (its input is a slice); a shard's gradient is the
    same contiguous shard (spec.shard) of the unsharded gradient, all of it for a replicated row-parallel bias.

    The usual causes: no all-reduce of the input gradient in column-parallel backward (Megatron's f), so
    each rank keeps the part through its own shard; an all-reduce whose backward all-reduces again
    (``torch.distributed.nn.functional.all_reduce``), which counts every gradient tp times; shard gradients
    all-reduced as data parallelism does, so each rank holds the sum of different shards' gradients.
    """
    case = data.draw(tp_cases(impl.offers(component)), label="case")
    results = submit(impl, case, "backward")
    x_grad, grads = unsharded_gradients(case)
    for rank, result in enumerate(results()):
        assert_close(
            torch.from_numpy(result["x_grad"]),
            spec.rank_input(component, x_grad, rank=rank, world_size=WORLD_SIZE), axes="b s d",
            claim=f"{case}: dL/dx {_where(rank)} equals the unsharded module's",
            hint="the column-parallel input passes an autograd Function whose backward all-reduces the gradient "
            "(identity forward); the row-parallel all-reduce's backward is the identity.",
        )
        for name, want in spec.shard(component, grads, rank=rank, world_size=WORLD_SIZE).items():
            got = result["grads"][name]
            claim = f"{case}: the gradient of {name} {_where(rank)} is its slice of the unsharded gradient"
            assert_true(got is not None, claim=claim, detail=f"{name} has no gradient (None) after backward",
                        hint="use the parameter itself in forward, not .data or .detach().")
            assert_close(torch.from_numpy(got), want, claim=claim,
                         hint="tensor-parallel shards need no gradient all-reduce (that is data parallelism); "
                         "the row-parallel all-reduce's backward is the identity.")


@DISTRIBUTED
@pytest.mark.needs(full_state=True)
@pytest.mark.parametrize("component", TENSOR_PARALLEL_MODULES)
@fewer_examples()
@given(data=st.data())
def test_tensor_parallel_ranks_hold_the_pinned_contiguous_shards(impl, component, data):
    """After load_full_state_dict(unsharded weights), rank p holds exactly the spec's shards: rows (or, for
    row-parallel weights, columns) p*n/tp .. (p+1)*n/tp - 1, gate and up (q, k, v) cut one by one, the
    row-parallel bias whole. Checkpoints saved per rank are exchangeable only under one map.

    The usual causes: interleaved shards (rank p taking every tp-th row), a fused [gate; up] or [k; v] cut
    as one tensor, KV heads assigned round-robin.
    """
    case = data.draw(tp_cases(impl.offers(component), full_state=True), label="case")
    results = submit(impl, case, "shards")
    full = {k: v.numpy() for k, v in full_weights(case).items()}
    for rank, result in enumerate(results()):
        for name, want in spec.shard(component, full, rank=rank, world_size=WORLD_SIZE).items():
            assert_equal(
                torch.from_numpy(result["held"][name]), torch.from_numpy(want),
                claim=f"{case}: {name} {_where(rank)} is its contiguous shard of the unsharded {name}",
                hint="rank p keeps rows p*n/tp .. (p+1)*n/tp - 1 (tensor.chunk(tp)[p]); slice gate and up (q, k, v) "
                "separately before fusing them.",
            )


# Per component: the size keyword it cuts over the ranks, and the other sizes it needs
SIZE_KEYWORDS = ("in_features", "out_features", "d_model", "d_ff", "n_head", "n_kv_head")
INDIVISIBLE = {
    "ColumnParallelLinear": ("out_features", {"in_features": 2}),
    "RowParallelLinear": ("in_features", {"out_features": 2}),
    "TensorParallelFeedForward": ("d_ff", {"d_model": 2}),
    "TensorParallelSwiGLU": ("d_ff", {"d_model": 2}),
}


@pytest.mark.parametrize("component", TENSOR_PARALLEL_MODULES)
@fewer_examples()
@given(data=st.data())
def test_tensor_parallel_modules_reject_sizes_the_world_size_does_not_divide(impl, component, data):
    """Constructing with a size tp does not divide (features split, n_head, n_kv_head), or with a rank
    outside 0 .. tp - 1, raises ValueError: ranks would hold unequal shards, or some features none.

    Constructors never communicate, so this runs without a process group. The usual cause: out_features //
    world_size without checking the remainder, which silently drops the last features.
    """
    tp = WORLD_SIZE
    cls = impl.raw(component)
    odd = 2 * data.draw(st.integers(0, 2), label="k") + 1  # 1, 3 or 5: never a multiple of tp = 2
    if data.draw(st.booleans(), label="bad_rank"):
        rank = data.draw(st.sampled_from([tp, tp + 1, -1]), label="rank")
        keywords = data.draw(tp_cases(impl.offers(component)), label="case").config
        what = f"rank={rank}"
    elif component == "TensorParallelAttention":
        rank, keywords = 0, {"d_model": 2 * odd, "n_head": odd, "n_kv_head": odd}  # tp divides neither head count
        what = f"n_head={odd}, n_kv_head={odd}"
    else:
        key, others = INDIVISIBLE[component]
        rank, keywords, what = 0, {**others, key: odd}, f"{key}={odd}"
    keywords = {k: v for k, v in keywords.items() if k in SIZE_KEYWORDS}  # options keep their defaults
    expect_value_error(
        lambda: cls(**keywords, world_size=tp, rank=rank),
        claim=f"{component}({', '.join(f'{k}={v}' for k, v in keywords.items())}, world_size={tp}, rank={rank}) "
        f"raises ValueError ({what})",
        hint="check that world_size divides every size you split and that 0 <= rank < world_size, and raise "
        "ValueError naming the values.", what="it built a",
    )
