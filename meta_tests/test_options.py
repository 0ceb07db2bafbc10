"""The option space tests itself: every option a strategy draws is consulted, declarations narrow the
draws, bad declarations are usage errors, and the plug-in contract's lookups (names, canonical names,
gradients through views, declared precision) hold. Spec of the mechanism: properties/options.py."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import implementations
from meta_tests.catalog import all_properties
from properties import precision
from properties.assertions import assert_close
from properties.options import OPTION_STRATEGIES, DeclarationError, full_offers, narrowed, read_declaration, unmet_need
from properties.plugin import ComponentFailure, Implementation, ImplementationLoadError
from spec import COMPONENTS

all_properties()  # imports every property module, which registers its strategies
DRAWS = 12  # derandomized: a strategy that ignores an option shows in a dozen draws as in thirty
STRATEGY_OPTIONS = [(s, name) for s in OPTION_STRATEGIES for name in s.readers]


def drawn_examples(strategy, offers) -> list:
    """DRAWS examples the strategy draws for ``offers`` (derandomized: the same ones every time)."""
    examples: list = []

    @settings(max_examples=DRAWS, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        examples.append(data.draw(strategy.fn(offers, **strategy.kwargs)))

    collect()
    return examples


def drawn_values(strategy, offers, option: str) -> set:
    """The values of ``option`` in DRAWS examples the strategy draws for ``offers``."""
    return {strategy.readers[option](example) for example in drawn_examples(strategy, offers)}


_FULL_SPACE_DRAWS: dict[int, list] = {}


def drawn_from_the_full_space(strategy, option: str) -> set:
    """drawn_values over the spec's whole option space, drawn once per strategy and process: every option
    of a strategy is read from the same derandomized examples, so one draw serves them all."""
    key = OPTION_STRATEGIES.index(strategy)
    if key not in _FULL_SPACE_DRAWS:
        _FULL_SPACE_DRAWS[key] = drawn_examples(strategy, full_offers(strategy.component))
    return {strategy.readers[option](example) for example in _FULL_SPACE_DRAWS[key]}


def _id(pair) -> str:
    strategy, option = pair
    return f"{strategy.fn.__name__}:{option}"


def test_every_option_of_every_component_is_drawn_by_a_strategy_or_needed_by_a_property():
    """An option nobody draws or needs is a promise the suite never checks."""
    drawn = {(s.component, name) for s, name in STRATEGY_OPTIONS}
    needed = set()
    for fn in all_properties().values():
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "needs":
                needed |= set(mark.kwargs)
    unused = [f"{c}.{o.name}" for c, entry in COMPONENTS.items() for o in entry.options
              if (c, o.name) not in drawn and o.name not in needed and o.kind != "convention"]
    assert not unused, f"options that no strategy draws and no property needs: {unused}"


@pytest.mark.parametrize("pair", STRATEGY_OPTIONS, ids=_id)
def test_a_strategy_draws_every_offered_value_of_its_options(pair):
    """Given the spec's whole option space, the strategy draws more than one value of each option it
    reads (an option drawn as a constant is not consulted at all)."""
    strategy, option = pair
    seen = drawn_from_the_full_space(strategy, option)
    assert len(seen) > 1, f"{strategy.fn.__name__} drew only {seen} for {option} from the full option space"


@pytest.mark.parametrize("pair", STRATEGY_OPTIONS, ids=_id)
def test_a_declaration_narrows_the_draws(pair):
    """Narrowed to one value (as a declaration does), the strategy draws only that value; for an input
    regime (a mask, s != t) the narrowing that matters is "never"."""
    strategy, option = pair
    full = full_offers(strategy.component)
    opt = COMPONENTS[strategy.component].option(option)
    values = [False] if opt.kind == "input" else list(full.offered(option))
    for value in values:
        seen = drawn_values(strategy, narrowed(full, **{option: value}), option)
        assert seen <= {value}, f"{strategy.fn.__name__} drew {option}={seen - {value}} although only {value!r} is offered"


# --- declarations -------------------------------------------------------------------------------


def test_an_unknown_option_is_a_usage_error_listing_the_valid_ones():
    class Attention(nn.Module):
        spec_options = {"casual": True}

    with pytest.raises(DeclarationError, match=r"'casual'.*Its options are: bias, cache, causal"):
        read_declaration("MultiHeadAttention", Attention, "Attention")


def test_an_invalid_value_is_a_usage_error_listing_the_valid_ones():
    class Norm(nn.Module):
        spec_options = {"activation": "tanh"}

    with pytest.raises(DeclarationError, match=r"activation.*'relu', 'gelu'"):
        read_declaration("FeedForward", Norm, "FeedForward")


def test_an_option_offered_with_one_value_is_never_passed_and_the_reference_follows_it():
    """A causal-only, bias-free attention without a mask argument is built without ``bias`` and called
    without ``causal`` or ``mask``; its canonical parameters are the weights alone."""
    from properties.attention_cases import attention_cases

    class CausalOnly(implementations.MultiHeadAttention):
        spec_options = {"causal": True, "mask": False, "bias": False, "rotary": False, "cache": False}

        def __init__(self, *, d_model: int, n_head: int) -> None:  # no bias keyword at all
            super().__init__(d_model=d_model, n_head=n_head, bias=False)

        def forward(self, x):  # no mask, no causal keyword
            return super().forward(x, causal=True)

    impl = Implementation("causal_only", SimpleNamespace(MultiHeadAttention=CausalOnly))
    module = impl.build("MultiHeadAttention", seed=0, d_model=4, n_head=2)
    assert sorted(module.canonical_state()) == ["k.weight", "o.weight", "q.weight", "v.weight"]
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    out = module(x, causal=True)  # the wrapper drops the built-in causal flag
    ours = Implementation("ours", implementations).build(
        "MultiHeadAttention", seed=0, d_model=4, n_head=2, bias=False)
    torch.testing.assert_close(out, ours(x, causal=True))
    with pytest.raises(AssertionError, match="suite bug"):
        module(x, causal=False)
    assert unmet_need(impl.offers("MultiHeadAttention"), {"causal": False}) == (
        "needs causal=False; CausalOnly (as MultiHeadAttention) offers causal=True only")

    @settings(max_examples=20, database=None, deadline=None)
    @given(st.data())
    def drawn_cases_run(data):
        case = data.draw(attention_cases(impl.offers("MultiHeadAttention")))
        assert case.causal and case.mask is None and not case.bias
        case.call(case.build(impl), case.inputs()[0], mask=case.mask, causal=case.causal)

    drawn_cases_run()


# --- names ---------------------------------------------------------------------------------------


def test_spec_components_maps_names_and_excludes_same_named_objects():
    """A SwiGLU called FeedForward: ``SPEC_COMPONENTS`` says which object is which spec component."""

    class FeedForward(nn.Module):  # really a SwiGLU
        pass

    namespace = SimpleNamespace(FeedForward=FeedForward, SPEC_COMPONENTS={"SwiGLU": FeedForward, "FeedForward": None})
    impl = Implementation("tutorial", namespace)
    assert impl.provides("SwiGLU") and not impl.provides("FeedForward")
    assert impl.owner("SwiGLU") == "FeedForward (as SwiGLU)"


def test_all_is_honoured():
    namespace = SimpleNamespace(LayerNorm=object(), RMSNorm=object(), __all__=["RMSNorm"])
    impl = Implementation("mod", namespace)
    assert impl.provided() == ["RMSNorm"]


def test_spec_components_naming_an_unknown_component_is_a_usage_error():
    impl = Implementation("mod", SimpleNamespace(LayerNorm=object(), SPEC_COMPONENTS={"LayerNrom": object()}))
    with pytest.raises(ImplementationLoadError, match="LayerNrom"):
        impl.validate()


def test_canonical_names_compose_through_sub_modules():
    """A layer maps only its own prefix ({"self_attn": "attn"}); its attention maps its own names."""

    class Attention(nn.Module):
        canonical_names = {"q.weight": "wq.weight"}

        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(2, 2, bias=False)

    class Layer(nn.Module):
        canonical_names = {"self_attn": "attn"}

        def __init__(self):
            super().__init__()
            self.attn = Attention()

    from properties.plugin import canonical_tensor

    layer = Layer()
    assert canonical_tensor(layer, "self_attn.q.weight") is layer.attn.wq.weight


def test_gradients_of_fused_parameters_are_read_through_their_base():
    """Regression: canonical_state_dict() hands out views of a fused QKV weight; a view has no .grad of
    its own, so a correctly trained fused layer was reported as getting no gradient."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "fused_qkv_attention.py"
    spec = importlib.util.spec_from_file_location("fused_example_for_grads", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    impl = Implementation("fused", module)
    built = impl.build("MultiHeadAttention", seed=0, d_model=4, n_head=2)
    built(torch.randn(1, 3, 4, dtype=torch.float64)).square().sum().backward()
    grads = built.parameter_gradients()
    assert all(g is not None and bool((g != 0).any()) for name, g in grads.items() if name.endswith("weight"))


# --- precision -------------------------------------------------------------------------------------


class _Float32RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input (the upcasting many libraries do)."""

    def __init__(self, *, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _rms_check(cls) -> AssertionError | None:
    precision.reset()
    impl = Implementation("lib", SimpleNamespace(RMSNorm=cls))
    module = impl.build("RMSNorm", seed=0, d_model=8)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = module.canonical_state()["weight"].detach()
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    try:
        assert_close(module(x), want, claim="RMSNorm agrees with the reference", hint="eps inside the root")
    except AssertionError as exc:
        return exc
    finally:
        precision.reset()
    return None


def test_undeclared_float32_compute_is_named_as_precision_not_math():
    failure = _rms_check(_Float32RMSNorm)
    assert failure is not None and "computes in float32 for float64 input" in str(failure)
    assert "eps inside the root" not in str(failure)  # the math hint is replaced, not appended


def test_declared_float32_compute_is_judged_by_the_float32_rule():
    class Declared(_Float32RMSNorm):
        spec_options = {"compute_dtype": "float32"}

    assert _rms_check(Declared) is None


# --- the ignored-option probe ----------------------------------------------------------------------


def test_an_option_accepted_but_ignored_is_named():
    """Regression: `causal=False` still causal (an option accepted but ignored) was blamed on head splits;
    the call wrapper now names the option."""

    class AlwaysCausal(implementations.MultiHeadAttention):
        def forward(self, x, *, mask=None, causal=False, cache=None):
            return super().forward(x, mask=mask, causal=True, cache=cache)

    impl = Implementation("learner", SimpleNamespace(MultiHeadAttention=AlwaysCausal))
    module = impl.build("MultiHeadAttention", seed=0, d_model=4, n_head=2)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with pytest.raises(ComponentFailure, match=r"accepts causal but ignores it: called with causal=False and "
                                               r"causal=True it returns bit-identical outputs"):
        module(x, causal=False)


def test_an_ignored_constructor_option_is_named():
    class FixedEpsLayerNorm(nn.Module):
        def __init__(self, *, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
            super().__init__()
            self.inner = nn.LayerNorm(d_model, eps=1e-5, bias=bias)  # eps accepted, never used

        canonical_names = {"weight": "inner.weight", "bias": "inner.bias"}

        def forward(self, x):
            return self.inner(x)

    impl = Implementation("learner", SimpleNamespace(LayerNorm=FixedEpsLayerNorm))
    module = impl.build("LayerNorm", seed=0, d_model=4, eps=1e-5)
    with pytest.raises(ComponentFailure, match="accepts eps but ignores it"):
        module(torch.randn(2, 4, dtype=torch.float64))


# --- a lazily allocated KV cache ---------------------------------------------------------------------


class LazyKVCache:
    """A correct cache that allocates its storage on the first update (keys/values are None before)."""

    def __init__(self, *, batch_size, n_kv_head, head_dim, capacity, dtype=torch.float32, device="cpu"):
        self.shape = (batch_size, n_kv_head, capacity, head_dim)
        self.dtype, self.device, self.capacity = dtype, device, capacity
        self.keys = self.values = None
        self.length = 0

    def update(self, k, v):
        if self.keys is None:
            self.keys = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.values = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        n = k.shape[-2]
        if self.length + n > self.capacity:
            raise ValueError(f"capacity {self.capacity} exceeded by {self.length} + {n}")
        self.keys[:, :, self.length : self.length + n] = k
        self.values[:, :, self.length : self.length + n] = v
        self.length += n
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reset(self):
        self.length = 0


@pytest.mark.parametrize("prop", ["test_kv_cache_holds_n_kv_head_heads", "test_kv_cache_update_returns_everything_appended"])
def test_a_lazily_allocated_cache_passes(prop):
    """Regression: a cache whose storage is None until the first update crashed the suite's own code
    (AttributeError: 'NoneType' object has no attribute 'shape')."""
    from meta_tests.catalog import OURS, quick_settings

    fn = all_properties()[prop]
    impl = Implementation("lazy", SimpleNamespace(KVCache=LazyKVCache), fallback=OURS)
    kwargs = {"impl": impl}
    if "device" in inspect.signature(fn).parameters:
        kwargs["device"] = "cpu"
    with quick_settings(fn):
        fn(**kwargs)


def test_options_are_inferred_from_signatures():
    """A tutorial's SelfAttention(d_model).forward(x) needs no declaration: no bias keyword means the
    spec's default (biases), no mask or causal keyword means neither is offered; **kwargs says nothing."""

    class SelfAttention(nn.Module):
        def __init__(self, d_model):
            super().__init__()

        def forward(self, x):
            return x

    offers = Implementation("seed", SimpleNamespace(SelfAttention=SelfAttention)).offers("SelfAttention")
    assert offers.offered("bias") == (True,) and offers.offered("causal") == (False,)
    assert offers.offered("mask") == (False,)
    assert unmet_need(offers, {"mask": True}) == (
        "needs mask=True; SelfAttention offers mask=False only (its signature has no 'mask'; declare "
        "spec_options to say otherwise)")

    class Flexible(SelfAttention):
        def forward(self, x, **kwargs):
            return x

    assert Implementation("lib", SimpleNamespace(SelfAttention=Flexible)).offers("SelfAttention").offered("mask") == (True, False)
