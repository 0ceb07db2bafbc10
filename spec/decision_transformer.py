"""The Decision Transformer (Chen et al. 2021): offline RL as return-conditioned sequence modelling.

Signatures (the constructor is keyword-only)
--------------------------------------------
    returns_to_go(rewards, *, gamma=1.0, mask=None) -> rtg
    DecisionTransformer(*, state_dim, act_dim, d_model, n_layer, n_head, max_timestep, d_ff=None,
                        action_space="discrete", action_tanh=True)
        .forward(returns_to_go, states, actions, timesteps, *, mask=None) -> actions predicted

Shapes (glossary of spec/__init__.py, plus this family's j, ds and da)
----------------------------------------------------------------------
    j   steps of a trajectory in the context window (K in the paper); the model sees 3j tokens
    ds  state width (state_dim);   da  actions (act_dim): the number of discrete actions, or the width of
        a continuous one
    rewards, rtg    (b, j) float                      mask   (b, j) bool, True = real step
    returns_to_go   (b, j, 1) float (the model's dtype)
    states          (b, j, ds) float
    actions         (b, j) long in 0 .. da - 1 (discrete), or (b, j, da) float (continuous)
    timesteps       (b, j) long in 0 .. max_timestep - 1: absolute environment steps
    out             (b, j, da): logits (discrete) or actions (continuous), the model's dtype and device

Math
----
returns_to_go (Bellman's recursion backwards over the steps, with rtg after the last step 0):
    rtg[:, j] = 0;   rtg[:, i] = mask[:, i] * (rewards[:, i] + gamma * rtg[:, i + 1])   for i = j - 1 .. 0
i.e. rtg[:, i] = sum_{i <= v <= end(i)} gamma^(v - i) rewards[:, v], end(i) the last real step before the
next padded one. At an episode's first step it is the episode's (discounted) return.

DecisionTransformer (step i of a trajectory is the three tokens R_i, s_i, a_i):
    E_time = embed_timestep.weight (max_timestep, d)   tau_i = E_time[timesteps[:, i]]    (one row per step)
    R_i = W_R returns_to_go[:, i] + b_R + tau_i          W_R = embed_return.weight (d, 1)
    s_i = W_s states[:, i] + b_s + tau_i                 W_s = embed_state.weight (d, ds)
    a_i = E_act[actions[:, i]] + tau_i                   discrete: E_act = embed_action.weight (da, d)
        = W_a actions[:, i] + b_a + tau_i                continuous: W_a = embed_action.weight (d, da)
    x = LayerNorm_embed([R_0, s_0, a_0, R_1, s_1, a_1, ..., R_{j-1}, s_{j-1}, a_{j-1}])    (b, 3j, d)
    for l in 0 .. n_layer - 1:
        x = DecoderLayer_l(x, mask=token_mask[:, None, None, :])       token_mask[:, 3i + k] = mask[:, i]
            (spec/layers.py: cross_attention=False, norm_first=True, causal self-attention over the 3j
             tokens, activation "gelu" (exact), norm "layer", eps 1e-5, biases, d_ff)
    x = LayerNorm_final(x)
    out[:, i] = W_p x[:, 3i + 1] + b_p                   W_p = predict_action.weight (da, d): read at s_i
    continuous with action_tanh: out = tanh(out)
So the prediction for step i sees R_0 .. R_i, s_0 .. s_i and a_0 .. a_{i-1}, never a_i nor a later token.

Conventions (pinned, with the reason)
-------------------------------------
* Token order (R, s, a) within a step, and the action read from the hidden state of s_i (the paper's
  Figure 1 and its code's ``x[:, 1]``): the prediction conditions on the desired return and the current
  state, and the causal mask keeps a_i out of it. Read from a_i's own token it would copy its input.
* One timestep embedding per step (an nn.Embedding of max_timestep rows) added to all three of its tokens.
  It is the only position information: there is no positional table over the 3j tokens (the paper's
  code removes GPT-2's), so a trajectory's tokens are placed by their environment steps, not by where
  they sit in the window. That is what lets a left-padded window keep its real steps' outputs.
* The causal mask is over tokens (3j of them), not over steps: a step-level mask would let s_i see a_i.
  The independence from a_i and later tokens is exact (bit for bit): masked keys get weight exp(-inf) = 0
  and every other operation acts per token.
* LayerNorm on the embedded tokens (the paper's ``embed_ln``) and a final LayerNorm (GPT-2's ``ln_f``);
  the layers are GPT-2's: pre-norm, LayerNorm eps 1e-5, GELU (exact erf form here), d_ff = 4 d_model
  unless given.
* Padding is on the left (the paper's evaluation pads the context window on the left): ``mask`` (b, j)
  True = real step; each of a padded step's three tokens is masked as a key. The padded steps' outputs
  are unspecified (finite). Their timesteps may be any valid value; real steps carry their absolute
  timesteps, padded or not.
* Discrete actions give logits (no softmax); continuous actions are tanh-squashed into (-1, 1)
  (``action_tanh=True``, the paper's code for its MuJoCo tasks); ``action_tanh=False`` returns the raw
  linear output.
* returns_to_go: mask False marks a step outside the episode (padding on either side); it gets 0, its
  reward has no influence at all (any finite value there changes nothing, exactly), and the sum stops
  there. Without a mask every step is real. gamma = 1 (the paper's undiscounted returns) by default,
  any 0 <= gamma <= 1 allowed.

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
    DecisionTransformer  action_space  "discrete" | "continuous"                      constructor
                         action_tanh   True | False (continuous actions squashed)     constructor
                         mask          True | False: forward takes ``mask`` (left padding)
    returns_to_go        gamma         1.0, any 0 <= gamma <= 1 declarable             call
                         mask          True | False: takes ``mask``
The first value is the spec's default. A discrete-only model declares ``{"action_space": "discrete"}``.

Canonical parameters (this order fixes the draws)
-------------------------------------------------
    embed_timestep.weight (max_timestep, d) "embedding"
    embed_return.weight (d, 1), embed_return.bias (d,)       embed_state.weight (d, ds), embed_state.bias (d,)
    embed_action.weight (da, d) "embedding" (discrete), or embed_action.weight (d, da), embed_action.bias (d,)
    embed_ln.weight (d,) "gain", embed_ln.bias (d,)
    layers.{l}.*   spec.layers.decoder_layer_parameters(cross_attention=False, activation="gelu", norm="layer")
    final_norm.weight (d,) "gain", final_norm.bias (d,)
    predict_action.weight (da, d), predict_action.bias (da,)

Properties (properties/test_decision_transformer.py)
----------------------------------------------------
returns_to_go agrees with this reference, follows rtg[i] = r[i] + gamma rtg[i + 1] with 0 after the last
step, equals the (discounted) episode return at the first real step, and gives padded steps 0 without
reading their rewards (exact). The model agrees with this reference (discrete and continuous, tanh or not,
with and without padding); its action at step i ignores a_i and everything after s_i (exact) and depends on
R_i, s_i and every earlier token; the three tokens of a step share one timestep embedding; a left-padded
trajectory's real steps get the outputs of the unpadded run; trajectories of a batch are independent
(exact). Learnability: trained on a mixed-quality behaviour policy's episodes of a contextual bandit,
conditioned on the best return it acts optimally.

The learnability environment (``bandit_episodes``, ``conditioned_rollout`` below): episodes of HORIZON = 3
steps; each step shows one of 3 contexts c (the state is its one-hot), arm (c + 1) % 3 pays 1 and the
others 0. The behaviour policy picks the paying arm with probability 0.3, a tempting arm c with 0.5 and
the third with 0.2, so imitating it picks the tempting arm; only conditioning on the return finds the
paying one. Evaluation is the paper's: R_0 = the target return, R_{i+1} = R_i - r_i, and a_i, unknown
while it is predicted, is given as 0.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange, repeat

from spec.feed_forward import linear
from spec.layers import decoder_layer, decoder_layer_parameters, norm_parameters, sub
from spec.normalization import layer_norm
from spec.registry import Component, Option, Param, boolean, component, same_shape_as_first_input

ACTION_SPACES = ("discrete", "continuous")
EPS = 1e-5
LAYER = {"cross_attention": False, "activation": "gelu", "norm": "layer"}


def feed_forward_width(d_model: int, d_ff: int | None) -> int:
    """d_ff, or GPT-2's 4 d_model when not given."""
    return 4 * d_model if d_ff is None else d_ff


def decision_transformer_parameters(
    *, state_dim, act_dim, d_model, n_layer, n_head, max_timestep, d_ff=None, action_space="discrete", **_,
) -> dict[str, Param]:
    d = d_model
    params = {
        "embed_timestep.weight": Param((max_timestep, d), "embedding"),
        "embed_return.weight": Param((d, 1)), "embed_return.bias": Param((d,), "bias"),
        "embed_state.weight": Param((d, state_dim)), "embed_state.bias": Param((d,), "bias"),
    }
    if action_space == "discrete":
        params["embed_action.weight"] = Param((act_dim, d), "embedding")
    else:
        params |= {"embed_action.weight": Param((d, act_dim)), "embed_action.bias": Param((d,), "bias")}
    params |= {f"embed_ln.{name}": p for name, p in norm_parameters(d_model=d, norm="layer").items()}
    for i in range(n_layer):
        layer = decoder_layer_parameters(d_model=d, n_head=n_head, d_ff=feed_forward_width(d, d_ff), **LAYER)
        params |= {f"layers.{i}.{name}": p for name, p in layer.items()}
    params |= {f"final_norm.{name}": p for name, p in norm_parameters(d_model=d, norm="layer").items()}
    return params | {"predict_action.weight": Param((act_dim, d)), "predict_action.bias": Param((act_dim,), "bias")}


GAMMA = Option("gamma", (1.0, 0.9, 0.5), "call", "the discount: rtg[i] = r[i] + gamma rtg[i + 1] (1: the paper's)",
               accepts=lambda g: isinstance(g, (int, float)) and not isinstance(g, bool) and 0 <= g <= 1)

RETURNS_TO_GO = component(Component(
    name="returns_to_go", kind="function", family="decision_transformer",
    summary="rewards-to-go rtg[i] = r[i] + gamma rtg[i + 1], 0 after the last (real) step",
    output_shape=same_shape_as_first_input,
    options=(GAMMA, boolean("mask", "takes mask= (b, j), True = real step (padding on either side)",
                            argument="mask")),
))
DECISION_TRANSFORMER = component(Component(
    name="DecisionTransformer", kind="module", family="decision_transformer",
    summary="(R, s, a) tokens with one timestep embedding per step, causal decoder layers, action read at s",
    parameters=decision_transformer_parameters,
    output_shape=None,  # (b, j, act_dim): the properties check it, discrete actions do not carry act_dim
    options=(
        Option("action_space", ACTION_SPACES, "init", "discrete actions (an embedding in, logits out) or "
               "continuous ones (linear in, linear out)"),
        boolean("action_tanh", "continuous actions are tanh-squashed into (-1, 1) (the paper's MuJoCo code)",
                kind="init"),
        boolean("mask", "forward takes mask= (b, j), True = real step (left padding)", argument="mask"),
    ),
))


def returns_to_go(rewards, *, gamma: float = 1.0, mask=None) -> np.ndarray:
    """The float64 reference, as the explicit sum: rtg[:, i] = sum over the real steps v >= i before the
    next padded one of gamma^(v - i) r[:, v]; 0 at padded steps."""
    r = np.asarray(rewards, dtype=np.float64)
    real = np.ones(r.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.zeros_like(r)
    b, j = r.shape
    for row in range(b):
        for i in range(j):
            v = i
            while v < j and real[row, v]:
                out[row, i] += gamma ** (v - i) * r[row, v]
                v += 1
    return out


def decision_transformer(
    params: dict[str, np.ndarray],
    returns_to_go: np.ndarray,
    states: np.ndarray,
    actions: np.ndarray,
    timesteps: np.ndarray,
    *,
    n_head: int,
    n_layer: int,
    action_space: str = "discrete",
    action_tanh: bool = True,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The float64 reference: actions predicted (b, j, da) (logits when discrete), eval mode."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    tau = p["embed_timestep.weight"][np.asarray(timesteps)]  # (b, j, d)
    ret = linear(np.asarray(returns_to_go, dtype=np.float64), p["embed_return.weight"], p["embed_return.bias"])
    state = linear(np.asarray(states, dtype=np.float64), p["embed_state.weight"], p["embed_state.bias"])
    if action_space == "discrete":
        act = p["embed_action.weight"][np.asarray(actions)]
    else:
        act = linear(np.asarray(actions, dtype=np.float64), p["embed_action.weight"], p["embed_action.bias"])
    tokens = np.stack([ret + tau, state + tau, act + tau], axis=2)  # (b, j, 3, d): R, s, a of each step
    x = layer_norm(sub(p, "embed_ln"), rearrange(tokens, "b j k d -> b (j k) d"), eps=EPS)
    keys = None if mask is None else repeat(np.asarray(mask, dtype=bool), "b j -> b 1 1 (j k)", k=3)
    for i in range(n_layer):
        x = decoder_layer(sub(p, f"layers.{i}"), x, n_head=n_head, norm_first=True, eps=EPS, mask=keys, **LAYER)
    x = layer_norm(sub(p, "final_norm"), x, eps=EPS)
    out = linear(x[:, 1::3], p["predict_action.weight"], p["predict_action.bias"])  # read at s_i
    return np.tanh(out) if action_space == "continuous" and action_tanh else out


# --------------------------------------------------------------------------------------------------------
# The learnability environment: a contextual bandit played for HORIZON steps (see the module docstring)

CONTEXTS, HORIZON = 3, 3
BEHAVIOUR = (0.3, 0.5, 0.2)  # probability of the paying arm (c + 1) % 3, the tempting arm c, the third (c + 2) % 3


def optimal_arm(contexts: np.ndarray) -> np.ndarray:
    return (np.asarray(contexts) + 1) % CONTEXTS


def one_hot(contexts: np.ndarray) -> np.ndarray:
    """The states (..., CONTEXTS) of contexts (...)."""
    return np.eye(CONTEXTS)[np.asarray(contexts)]


def bandit_episodes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n episodes of the behaviour policy: contexts (n, HORIZON), its arms (n, HORIZON), rewards (n, HORIZON)."""
    contexts = rng.integers(CONTEXTS, size=(n, HORIZON))
    kind = rng.choice(3, size=(n, HORIZON), p=BEHAVIOUR)  # 0: paying, 1: tempting, 2: third
    arms = (contexts + np.array([1, 0, 2])[kind]) % CONTEXTS
    return contexts, arms, (arms == optimal_arm(contexts)).astype(np.float64)


def conditioned_rollout(act, contexts: np.ndarray, target_return: float) -> tuple[np.ndarray, np.ndarray]:
    """Play the episodes of ``contexts`` (n, HORIZON) with a return-conditioned policy, as the paper
    evaluates: R_0 = target_return, R_{i+1} = R_i - r_i. ``act(returns_to_go (n, i + 1, 1), states
    (n, i + 1, CONTEXTS), actions (n, i + 1), timesteps (n, i + 1)) -> arms (n,)`` chooses the arm of step i
    (its a_i input is 0: unknown). Returns the arms (n, HORIZON) and rewards (n, HORIZON)."""
    n = len(contexts)
    states, timesteps = one_hot(contexts), np.broadcast_to(np.arange(HORIZON), (n, HORIZON))
    target = np.full((n, HORIZON, 1), float(target_return))
    arms = np.zeros((n, HORIZON), dtype=np.int64)
    rewards = np.zeros((n, HORIZON))
    for i in range(HORIZON):
        arms[:, i] = act(target[:, : i + 1], states[:, : i + 1], arms[:, : i + 1], timesteps[:, : i + 1])
        rewards[:, i] = arms[:, i] == optimal_arm(contexts[:, i])
        if i + 1 < HORIZON:
            target[:, i + 1, 0] = target[:, i, 0] - rewards[:, i]
    return arms, rewards
