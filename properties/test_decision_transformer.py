"""Properties of the Decision Transformer family: returns_to_go and DecisionTransformer.
Spec: spec/decision_transformer.py (j steps, ds state width, da actions; step i is the tokens R_i, s_i, a_i).

PyTorch has no Decision Transformer, so these run on ours (and a learner's); the PyTorch adapters skip them.
Configurations are drawn from what the implementation offers (properties/options.py): discrete or
continuous actions, the tanh squash, padding masks and the discount.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import CheckedModule, ComponentFailure, Implementation
from properties.strategies import Mask, boolean_masks, seeds, tensor
from properties.training import train
from spec import decision_transformer as spec

RTG, DT = "returns_to_go", "DecisionTransformer"
OURS = Implementation("ours", implementations)  # the same-dtype baseline of the error-ratio rule


def numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def left_padding(lengths: list[int], j: int) -> np.ndarray:
    """(b, j) step mask, True = real step, the real steps last (padding on the left)."""
    return (np.arange(j)[None, :] >= j - np.asarray(lengths)[:, None]).view(Mask)


# --------------------------------------------------------------------------------------------------------
# returns_to_go: cases


@dataclass(frozen=True)
class RtgCase:
    """One call: b trajectories of j steps, the discount, a step mask (None: every step real), a seed."""

    b: int
    j: int
    gamma: float
    seed: int
    mask: np.ndarray | None = None

    def rewards(self, device="cpu", dtype=torch.float64, *, salt: int = 0) -> Tensor:
        return tensor(self.seed + salt, self.b, self.j, dtype=dtype, device=device)

    def keep(self, device="cpu") -> Tensor | None:
        return None if self.mask is None else torch.as_tensor(self.mask, device=device)

    def call(self, fn, rewards: Tensor) -> Tensor:
        __tracebackhide__ = True
        kwargs = {} if self.mask is None else {"mask": self.keep(rewards.device)}
        return fn(rewards, gamma=self.gamma, **kwargs)

    def reference(self, rewards: Tensor) -> np.ndarray:
        return spec.returns_to_go(numpy(rewards), gamma=self.gamma, mask=self.mask)


@draws_options(RTG, gamma=lambda c: c.gamma, mask=lambda c: c.mask is not None)
@st.composite
def rtg_cases(draw, offers: Offers, *, masks: str = "any") -> RtgCase:
    """Rewards of b <= 3 trajectories of j <= 6 steps, a gamma the function offers, and a mask.

    masks: "any" (none, or any pattern where a mask is taken), "episode" (none, or left padding: each
           row's real steps are one episode, last), "required" (a mask with at least one padded step).
    """
    b = draw(st.integers(1, 3), label="b")
    j = draw(st.integers(2 if masks == "required" else 1, 6), label="j")
    gamma = draw(offers.strategy("gamma"), label="gamma")
    mask = None
    if masks == "required":
        mask = draw(boolean_masks((b, j)), label="mask")
        if mask.all():
            mask[0, draw(st.integers(0, j - 1), label="padded_step")] = False
    elif draw(offers.strategy("mask"), label="with_mask"):
        if masks == "episode":
            mask = left_padding(draw(st.lists(st.integers(1, j), min_size=b, max_size=b), label="lengths"), j)
        else:
            mask = draw(boolean_masks((b, j)), label="mask")
    return RtgCase(b=b, j=j, gamma=gamma, seed=draw(seeds(), label="seed"), mask=mask)


# --------------------------------------------------------------------------------------------------------
# returns_to_go: properties


@pytest.mark.requires(RTG)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_returns_to_go_agrees_with_reference(impl, device, dtype, data):
    """returns_to_go equals the spec's float64 reference, the explicit sum of gamma^(v - i) r[v] over the
    real steps v >= i before the next padded one, for every offered gamma and mask.

    Hint: sum backwards, rtg[i] = r[i] + gamma * rtg[i + 1], starting from 0 after the last step; a
    cumulative sum from the front adds up the rewards already collected instead.
    """
    case = data.draw(rtg_cases(impl.offers(RTG)), label="case")
    rewards = case.rewards(device, dtype)
    assert_close(
        case.call(impl.function(RTG), rewards), case.reference(rewards), axes="b j",
        baseline=case.call(OURS.raw(RTG), rewards),
        claim=f"returns_to_go agrees with the spec's reference ({case}, {dtype})",
        hint="rewards-to-go look forward: rtg[i] sums the rewards of steps i, i + 1, ..., discounted by gamma.",
    )


@pytest.mark.requires(RTG)
@given(data=st.data())
def test_returns_to_go_follows_the_backward_recursion(impl, data):
    """rtg[i] = r[i] + gamma * rtg[i + 1] at every real step, with rtg after the last step 0 (the last
    step's rtg is its own reward) and 0 at padded steps.

    Hint: the current reward is included (rtg[i] starts with r[i], undiscounted), and the recursion starts
    from 0, not from the last reward counted twice.
    """
    case = data.draw(rtg_cases(impl.offers(RTG)), label="case")
    rewards = case.rewards()
    rtg = case.call(impl.function(RTG), rewards)
    ahead = torch.cat([rtg[:, 1:], torch.zeros_like(rtg[:, :1])], dim=1)  # rtg[i + 1], 0 after the last step
    expected = numpy(rewards) + case.gamma * numpy(ahead)
    if case.mask is not None:
        expected = np.where(case.mask, expected, 0.0)
    assert_close(
        rtg, expected, axes="b j",
        claim=f"returns_to_go satisfies rtg[i] = r[i] + gamma rtg[i + 1], rtg[j] = 0 ({case})",
        hint="rtg[i] includes r[i] itself, and gamma multiplies only the rest of the return.",
    )


@pytest.mark.requires(RTG)
@given(data=st.data())
def test_returns_to_go_at_an_episodes_first_step_is_its_return(impl, data):
    """At an episode's first real step (step 0, or the first step after left padding) rtg is the episode's
    discounted return, sum_v gamma^v r[first + v] (with gamma = 1: the sum of its rewards).

    Hint: rtg[first] must see every later reward of the episode, each discounted once per step of delay.
    """
    case = data.draw(rtg_cases(impl.offers(RTG), masks="episode"), label="case")
    rewards = case.rewards()
    rtg = case.call(impl.function(RTG), rewards)
    first = [0] * case.b if case.mask is None else [int(np.argmax(row)) for row in np.asarray(case.mask)]
    r = numpy(rewards)
    episode = np.array([sum(case.gamma**v * r[i, f + v] for v in range(case.j - f)) for i, f in enumerate(first)])
    assert_close(
        rtg[torch.arange(case.b), torch.tensor(first)], episode, axes="b",
        claim=f"returns_to_go at each episode's first step is its discounted return ({case}, first steps {first})",
        hint="rewards-to-go run backwards from the episode's end; a forward cumulative sum gives r[first] here.",
    )


@pytest.mark.requires(RTG)
@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_returns_to_go_gives_padded_steps_zero_without_reading_their_rewards(impl, data):
    """With a step mask, padded steps (False) get rtg 0 and their rewards change nothing anywhere (exact):
    a padded step ends the episode before it.

    Hint: a padded step's reward must not be added into the steps before it: zero the running sum at padded
    steps, before adding it to earlier rewards.
    """
    case = data.draw(rtg_cases(impl.offers(RTG), masks="required"), label="case")
    fn = impl.function(RTG)
    rewards = case.rewards()
    other = torch.where(case.keep(), rewards, case.rewards(salt=1) * 100)
    rtg = case.call(fn, rewards)
    assert_equal(
        case.call(fn, other), rtg, axes="b j",
        claim=f"returns_to_go ignores the rewards of padded steps ({case})",
        hint="stop the sum at a padded step: rtg[i] = mask[i] * (r[i] + gamma rtg[i + 1]).",
    )
    padded = ~case.keep()
    assert_equal(rtg[padded], torch.zeros_like(rtg[padded]), claim=f"padded steps get rtg 0 ({case})",
                 hint="set rtg to 0 where the mask is False.")


# --------------------------------------------------------------------------------------------------------
# DecisionTransformer: cases


@dataclass(frozen=True)
class Steps:
    """The model's four inputs, in the spec's order (the token order R, s, a, then the timesteps)."""

    returns_to_go: Tensor  # (b, j, 1)
    states: Tensor  # (b, j, ds)
    actions: Tensor  # (b, j) long, or (b, j, da)
    timesteps: Tensor  # (b, j) long

    @property
    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.returns_to_go, self.states, self.actions, self.timesteps

    def after(self, steps: slice, other: Steps, which: tuple[str, ...]) -> Steps:
        """A copy with the named inputs replaced by ``other``'s at ``steps``."""
        out = {}
        for name in ("returns_to_go", "states", "actions", "timesteps"):
            mine = getattr(self, name)
            if name in which:
                mine = mine.clone()
                mine[:, steps] = getattr(other, name)[:, steps]
            out[name] = mine
        return Steps(**out)


@dataclass(frozen=True)
class DtCase:
    """One model and its input, by the glossary: b trajectories of j steps, ds state width, da actions, h heads
    of width e (d = h e), n_layer layers, timesteps in 0 .. max_timestep - 1 (row i starts at starts[i]);
    the options, and a left-padding step mask (None: no mask passed)."""

    b: int
    j: int
    ds: int
    da: int
    h: int
    e: int
    n_layer: int
    max_timestep: int
    starts: tuple[int, ...]
    action_space: str
    action_tanh: bool
    seed: int
    mask: np.ndarray | None = None

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def discrete(self) -> bool:
        return self.action_space == "discrete"

    def config(self) -> dict:
        return dict(state_dim=self.ds, act_dim=self.da, d_model=self.d, n_layer=self.n_layer, n_head=self.h,
                    max_timestep=self.max_timestep, action_space=self.action_space, action_tanh=self.action_tanh)

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, params=None) -> CheckedModule:
        return impl.build(DT, seed=self.seed, device=device, dtype=dtype, params=params, **self.config())

    def steps(self, device="cpu", dtype=torch.float64, *, salt: int = 0) -> Steps:
        """Returns-to-go, states and actions drawn from the seed (``salt`` for another draw of them) and the
        rows' absolute timesteps starts[i] .. starts[i] + j - 1 (another draw: any valid timesteps)."""
        seed = self.seed + 10 * salt
        gen = torch.Generator().manual_seed(seed + 3)
        if self.discrete:
            actions = torch.randint(self.da, (self.b, self.j), generator=gen).to(device)
        else:
            actions = tensor(seed + 3, self.b, self.j, self.da, dtype=dtype, device=device)
        if salt == 0:
            timesteps = torch.tensor(self.starts)[:, None] + torch.arange(self.j)
        else:
            timesteps = torch.randint(self.max_timestep, (self.b, self.j), generator=gen)
        return Steps(tensor(seed + 1, self.b, self.j, 1, dtype=dtype, device=device),
                     tensor(seed + 2, self.b, self.j, self.ds, dtype=dtype, device=device),
                     actions, timesteps.to(device))

    def changed(self, steps: Steps, device="cpu") -> Steps:
        """Every input replaced by another draw; discrete actions are moved to a different action."""
        other = self.steps(device, steps.states.dtype, salt=1)
        if self.discrete:
            shift = other.actions % (self.da - 1) + 1  # 1 .. da - 1
            other = replace(other, actions=(steps.actions + shift) % self.da)
        return other

    def keep(self, device="cpu") -> Tensor | None:
        return None if self.mask is None else torch.as_tensor(self.mask, device=device)

    def __repr__(self) -> str:
        tanh = f", action_tanh={self.action_tanh}" if not self.discrete else ""
        mask = "" if self.mask is None else f", mask={self.mask!r}"
        return (f"DtCase(b={self.b}, j={self.j}, ds={self.ds}, da={self.da}, h={self.h}, e={self.e}, d={self.d}, "
                f"n_layer={self.n_layer}, max_timestep={self.max_timestep}, starts={self.starts}, "
                f"{self.action_space}{tanh}{mask}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@draws_options(DT, action_space=lambda c: c.action_space, action_tanh=lambda c: c.action_tanh,
               mask=lambda c: c.mask is not None)
@st.composite
def dt_cases(draw, offers: Offers, *, padded: bool | None = None, min_b: int = 1, max_layers: int = 1) -> DtCase:
    """A small model (4 <= d <= 8, n_layer <= max_layers, j <= 4 steps) of the options ``offers`` offers, and
    its input. d >= 4: a LayerNorm over 2 features keeps only the sign of their difference, which would
    hide dependencies.

    padded: True: a left-padding mask (the property needs mask=True); False: no mask; None: no mask, or a
            left-padding mask where the model takes one.
    max_timestep >= 3j, so a model that indexes the timestep table by token position does not crash.
    """
    b = draw(st.integers(min_b, 3), label="b")
    j = draw(st.integers(1, 4), label="j")
    h = draw(st.sampled_from([1, 2]), label="h")
    max_timestep = 3 * j + draw(st.integers(0, 3), label="spare_timesteps")
    starts = tuple(draw(st.lists(st.integers(0, max_timestep - j), min_size=b, max_size=b), label="starts"))
    mask = None
    if padded or (padded is None and draw(offers.strategy("mask"), label="with_mask")):
        lengths = draw(st.lists(st.integers(1, j), min_size=b, max_size=b), label="lengths")
        mask = left_padding(lengths, j)
    return DtCase(
        b=b, j=j, ds=draw(st.integers(1, 3), label="ds"), da=draw(st.integers(2, 3), label="da"), h=h,
        e=draw(st.sampled_from([4] if h == 1 else [2, 4]), label="e"),
        n_layer=draw(st.integers(1, max_layers), label="n_layer"),
        max_timestep=max_timestep, starts=starts,
        action_space=draw(offers.strategy("action_space"), label="action_space"),
        action_tanh=draw(offers.strategy("action_tanh"), label="action_tanh"),
        seed=draw(seeds(), label="seed"), mask=mask,
    )


def run(model: CheckedModule, case: DtCase, steps: Steps, mask: Tensor | None = None) -> Tensor:
    """model(returns_to_go, states, actions, timesteps[, mask=]) with the spec's output shape (b, j, da) checked."""
    __tracebackhide__ = True
    out = model(*steps.args, **({} if mask is None else {"mask": mask}))
    want = (*steps.timesteps.shape, case.da)
    if tuple(out.shape) != want:
        raise ComponentFailure(f"{model}: returned shape {tuple(out.shape)}, the spec says (b, j, da) = {want}")
    return out


def reference(model: CheckedModule, case: DtCase, steps: Steps, mask: Tensor | None = None) -> np.ndarray:
    params = model.canonical_numpy()
    return spec.decision_transformer(
        params, *(numpy(t) if t.is_floating_point() else t.cpu().numpy() for t in steps.args), n_head=case.h,
        n_layer=case.n_layer, action_space=case.action_space, action_tanh=case.action_tanh,
        mask=None if mask is None else mask.cpu().numpy())


AXES = "b j da"


# --------------------------------------------------------------------------------------------------------
# DecisionTransformer: properties


@pytest.mark.requires(DT)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_decision_transformer_agrees_with_reference(impl, device, dtype, data):
    """The predicted actions (logits when discrete) equal the spec's float64 reference with the same weights,
    for discrete and continuous actions, with and without the tanh squash and a left-padding mask.

    Hint: tokens R_i, s_i, a_i interleaved, each plus the timestep embedding of step i; LayerNorm; pre-norm
    causal layers over the 3j tokens; final LayerNorm; the head reads the hidden state of s_i.
    """
    case = data.draw(dt_cases(impl.offers(DT), max_layers=2), label="case")
    steps = case.steps(device, dtype)
    keep = case.keep(device)
    model = case.build(impl, device, dtype)
    baseline = None if dtype == torch.float64 else run(case.build(OURS, device, dtype), case, steps, keep)
    assert_close(
        run(model, case, steps, keep), reference(model, case, steps, keep), baseline=baseline, axes=AXES,
        claim=f"DecisionTransformer agrees with the spec's reference ({case}, {dtype})",
        hint="embed (R, s, a) per step, add one timestep row to each, embed_ln, causal layers, final norm, "
        "head at s_i.",
    )


@pytest.mark.requires(DT)
@given(data=st.data())
def test_predicted_action_ignores_its_own_action_and_everything_after_its_state(impl, device, data):
    """The action predicted for step i is the same (exactly) whatever a_i, a_{i+1}, ... and whatever the
    returns-to-go, states and timesteps of the steps after i are: it reads R_0 .. R_i, s_0 .. s_i and
    a_0 .. a_{i-1} only.

    Hint: read the action from the hidden state of s_i (token 3i + 1), not of a_i, and make the mask causal
    over the 3j tokens, not over the j steps (a step-level mask lets s_i see a_i).
    """
    case = data.draw(dt_cases(impl.offers(DT), padded=False), label="case")
    step = data.draw(st.integers(0, case.j - 1), label="step")
    model = case.build(impl, device)
    steps = case.steps(device)
    other = case.changed(steps, device)
    changed = steps.after(slice(step, None), other, ("actions",))
    changed = changed.after(slice(step + 1, None), other, ("returns_to_go", "states", "timesteps"))
    assert_equal(
        run(model, case, changed)[:, : step + 1], run(model, case, steps)[:, : step + 1], axes=AXES,
        claim=f"{case}: the actions of steps <= {step} ignore a_{step} and every token after s_{step}",
        hint="tokens are (R, s, a) per step and the head reads s_i: the causal mask then hides a_i from it.",
    )


@pytest.mark.requires(DT)
@given(data=st.data())
def test_predicted_action_depends_on_its_return_its_state_and_every_earlier_token(impl, device, data):
    """Changing R_i alone, s_i alone, or any one token of an earlier step (R_v, s_v or a_v, v < i) changes the
    action predicted for step i, in every trajectory of the batch.

    Hint: the head must read s_i, which sees R_i (just before it) and every earlier token; reading another
    token (R_i, or a token of another step) loses s_i or the return it is conditioned on.
    """
    case = data.draw(dt_cases(impl.offers(DT), padded=False), label="case")
    step = data.draw(st.integers(0, case.j - 1), label="step")
    model = case.build(impl, device)
    steps = case.steps(device)
    other = case.changed(steps, device)
    base = run(model, case, steps)[:, step]
    tokens = [(step, "returns_to_go", "R"), (step, "states", "s")]
    tokens += [(v, name, sym) for v in range(step) for name, sym in
               (("returns_to_go", "R"), ("states", "s"), ("actions", "a"))]
    for v, name, sym in tokens:
        out = run(model, case, steps.after(slice(v, v + 1), other, (name,)))[:, step]
        change = (out - base).abs().amax(dim=-1)  # (b,): per trajectory
        assert_true(
            bool((change > 1e-9).all()),
            claim=f"{case}: the action predicted at step {step} depends on {sym}_{v}",
            detail=f"changing {sym}_{v} changed it by at most {change.tolist()} per trajectory",
            hint=f"token {sym}_{v} must be visible to the hidden state the head reads, that of s_{step}.",
        )


@pytest.mark.requires(DT)
@given(data=st.data())
def test_three_tokens_of_a_step_share_one_timestep_embedding(impl, device, data):
    """Adding a vector to the timestep embedding rows of the steps in use and subtracting it from the
    return, state and action embeddings' biases (every row of a discrete action table) leaves the output
    unchanged: each token of step i gets exactly one timestep row, that of timesteps[:, i].

    Hint: look up embed_timestep(timesteps) (b, j, d) once per step and add it to all three tokens of the
    step; indexing the table by token position (0 .. 3j - 1) is a positional embedding, not a timestep one.
    """
    case = data.draw(dt_cases(impl.offers(DT)), label="case")
    model = case.build(impl, device)
    steps, keep = case.steps(device), case.keep(device)
    params = {name: value.detach().clone() for name, value in model.canonical_state().items()}
    delta = tensor(case.seed + 7, case.d, dtype=torch.float64, device=device)
    params["embed_timestep.weight"][steps.timesteps.unique()] += delta
    action = "embed_action.weight" if case.discrete else "embed_action.bias"  # a discrete table: every row
    for name in ("embed_return.bias", "embed_state.bias", action):
        params[name] -= delta
    assert_close(
        run(case.build(impl, device, params=params), case, steps, keep), numpy(run(model, case, steps, keep)),
        axes=AXES,
        claim=f"{case}: moving a vector from the R, s, a embeddings into the used timestep rows changes nothing",
        hint="one timestep row per step, added to R_i, s_i and a_i alike (not per token position, not to s_i only).",
    )


@pytest.mark.requires(DT)
@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_left_padded_trajectories_give_real_steps_their_unpadded_outputs(impl, device, data):
    """In a left-padded batch with its step mask, every trajectory's real steps get the outputs of the
    trajectory run alone without padding (its real steps keep their absolute timesteps), whatever the
    padded steps hold.

    Hint: mask True = real step; each of its three tokens is a key to mask (repeat the mask per token,
    interleaved like the tokens); positions come from the timesteps only, so padding shifts nothing.
    """
    case = data.draw(dt_cases(impl.offers(DT), padded=True), label="case")
    model = case.build(impl, device)
    steps = case.steps(device)
    batch = run(model, case, steps, case.keep(device))
    for i, length in enumerate(np.asarray(case.mask).sum(axis=1).tolist()):
        first = case.j - length
        alone = run(model, case, Steps(*(t[i : i + 1, first:] for t in steps.args)))
        assert_close(
            batch[i : i + 1, first:], numpy(alone), axes=AXES,
            claim=f"{case}: trajectory {i} ({length} real steps after {first} padded) gets its unpadded outputs",
            hint="mask the padded steps' three tokens as keys; add timestep embeddings, never token positions.",
        )


@pytest.mark.requires(DT)
@given(data=st.data())
def test_trajectories_in_a_batch_are_independent(impl, device, data):
    """Replacing every input of one trajectory (returns, states, actions, timesteps) leaves the outputs of
    the other trajectories unchanged (exactly).

    Hint: nothing may mix the batch axis: index the timestep table with the whole (b, j) timesteps, not
    with timesteps[0], and normalise per token, never over the batch.
    """
    case = data.draw(dt_cases(impl.offers(DT), min_b=2), label="case")
    row = data.draw(st.integers(0, case.b - 1), label="changed_trajectory")
    model = case.build(impl, device)
    steps, keep = case.steps(device), case.keep(device)
    other = case.changed(steps, device)
    changed = Steps(*(torch.cat([mine[:row], theirs[row : row + 1], mine[row + 1 :]])
                      for mine, theirs in zip(steps.args, other.args)))
    others = [i for i in range(case.b) if i != row]
    assert_equal(
        run(model, case, changed, keep)[others], run(model, case, steps, keep)[others], axes=AXES,
        claim=f"{case}: changing trajectory {row} leaves trajectories {others} unchanged",
        hint="every operation must act per trajectory (per row of the batch).",
    )


# --------------------------------------------------------------------------------------------------------
# Learnability: a contextual bandit with a mixed-quality behaviour policy (spec.bandit_episodes)


BANDIT_SEED = 20240611


def train_on_bandit(model: CheckedModule, *, episodes: int = 2000, steps: int = 100,
                    seed: int = BANDIT_SEED) -> list[float]:
    """Adam (lr 1e-2, batches of 64 episodes; properties/training.train) on the behaviour policy's
    episodes: cross-entropy of the predicted arm logits against the arms taken, returns-to-go from the
    spec's reference. Returns the losses."""
    contexts, arms, rewards = spec.bandit_episodes(episodes, np.random.default_rng(seed))
    rtg = torch.as_tensor(spec.returns_to_go(rewards), dtype=torch.float32)[..., None]
    states = torch.as_tensor(spec.one_hot(contexts), dtype=torch.float32)
    arms = torch.as_tensor(arms)
    timesteps = torch.arange(spec.HORIZON).expand(episodes, spec.HORIZON)

    def loss_of_batch(i: Tensor) -> Tensor:
        logits = model(rtg[i], states[i], arms[i], timesteps[i])
        return F.cross_entropy(logits.reshape(-1, spec.CONTEXTS), arms[i].reshape(-1))

    return train(model, loss_of_batch, steps=steps, lr=1e-2, batch=64, n_train=episodes)


def greedy_arms(model: CheckedModule):
    """The policy spec.conditioned_rollout plays: the arm of largest logit at the last step given."""

    def act(returns_to_go, states, actions, timesteps):
        with torch.no_grad():
            logits = model(torch.as_tensor(returns_to_go, dtype=torch.float32),
                           torch.as_tensor(states, dtype=torch.float32), torch.as_tensor(actions),
                           torch.as_tensor(np.ascontiguousarray(timesteps)))
        return logits[:, -1].argmax(-1).numpy()

    return act


@pytest.mark.slow
@pytest.mark.requires(DT)
@pytest.mark.needs(action_space="discrete")
def test_decision_transformer_conditioned_on_the_best_return_acts_optimally(impl):
    """A 1-layer DecisionTransformer (d_model 16) trained 100 Adam steps on 2000 episodes of a 3-step
    contextual bandit, collected by a policy that picks the paying arm only 30% of the time and a tempting
    one 50%, picks the paying arm in at least 90% of the steps of 300 new episodes when conditioned on the
    best return (R_0 = 3, then R_{i+1} = R_i - r_i); measured: 100%. Imitating the behaviour (ignoring R)
    would pick the tempting arm; a model that sees a_i while predicting it learns to copy it (its training
    loss goes to 0) and picks arm 0, the placeholder of the unknown a_i.

    Hint: a model that trains well but acts badly reads the action it predicts during training: read the
    hidden state of s_i, under a causal mask over tokens.
    """
    model = impl.build(DT, seed=BANDIT_SEED, dtype=torch.float32, state_dim=spec.CONTEXTS, act_dim=spec.CONTEXTS,
                       d_model=16, n_layer=1, n_head=2, max_timestep=spec.HORIZON)
    losses = train_on_bandit(model)
    contexts, _, _ = spec.bandit_episodes(300, np.random.default_rng(BANDIT_SEED + 1))
    arms, _ = spec.conditioned_rollout(greedy_arms(model), contexts, target_return=spec.HORIZON)
    accuracy = float((arms == spec.optimal_arm(contexts)).mean())
    assert_true(
        accuracy >= 0.9, claim="a tiny DecisionTransformer conditioned on the best return picks the paying arm",
        detail=f"paying arm in {accuracy:.3f} of the steps (< 0.9; the behaviour policy: 0.3) "
        f"(train loss {losses[0]:.3f} -> {losses[-1]:.3f})",
        hint="the action of step i is read at s_i, which must not see a_i: check the token order and the mask.",
    )
