"""Mutants of the Decision Transformer family: each a realistic bug, as the smallest change to ours."""

from __future__ import annotations

import torch
from einops import rearrange, repeat

from implementations.decision_transformer import DecisionTransformer, returns_to_go
from meta_tests.catalog import mutant

RTG, DT = "returns_to_go", "DecisionTransformer"
RTG_AGREES = "test_returns_to_go_agrees_with_reference"
RECURSION = "test_returns_to_go_follows_the_backward_recursion"
EPISODE_RETURN = "test_returns_to_go_at_an_episodes_first_step_is_its_return"
RTG_PADDING = "test_returns_to_go_gives_padded_steps_zero_without_reading_their_rewards"
AGREES = "test_decision_transformer_agrees_with_reference"
IGNORES = "test_predicted_action_ignores_its_own_action_and_everything_after_its_state"
DEPENDS = "test_predicted_action_depends_on_its_return_its_state_and_every_earlier_token"
TIMESTEP = "test_three_tokens_of_a_step_share_one_timestep_embedding"
PADDED = "test_left_padded_trajectories_give_real_steps_their_unpadded_outputs"
BATCH = "test_trajectories_in_a_batch_are_independent"
LEARNS = "test_decision_transformer_conditioned_on_the_best_return_acts_optimally"


# -- returns_to_go ---------------------------------------------------------------------------------------


@mutant(name="returns_to_go_forward_cumsum", bug="rewards-to-go as a forward cumulative sum (the return so far)",
        provides=RTG, caught_by=[RTG_AGREES, RECURSION, EPISODE_RETURN])
def returns_to_go_forward_cumsum(rewards, *, gamma=1.0, mask=None):
    return returns_to_go(rewards.flip(1), gamma=gamma, mask=None if mask is None else mask.flip(1)).flip(1)


@mutant(name="returns_to_go_counts_padded_rewards",
        bug="the sum runs over every step and the mask only zeroes the output: padded rewards leak into earlier steps",
        provides=RTG, caught_by=[RTG_PADDING])
def returns_to_go_counts_padded_rewards(rewards, *, gamma=1.0, mask=None):
    rtg = returns_to_go(rewards, gamma=gamma)
    return rtg if mask is None else torch.where(mask, rtg, torch.zeros_like(rtg))


@mutant(name="returns_to_go_discounts_the_current_reward", bug="rtg[i] = gamma * (r[i] + rtg[i + 1])",
        provides=RTG, caught_by=[RECURSION, RTG_AGREES])
def returns_to_go_discounts_the_current_reward(rewards, *, gamma=1.0, mask=None):
    return gamma * returns_to_go(rewards, gamma=gamma, mask=mask)


# -- the model: which token the action is read from ----------------------------------------------------


@mutant(name="DecisionTransformer_action_read_from_action_token",
        bug="the action of step i is read from the hidden state of a_i (it sees the action it predicts)",
        provides=DT, caught_by=[IGNORES, AGREES, LEARNS])
class ActionReadFromActionToken(DecisionTransformer):
    def state_tokens(self, x):
        return x[:, 2::3]


@mutant(name="DecisionTransformer_action_read_from_return_token",
        bug="the action of step i is read from the hidden state of R_i (it never sees s_i)",
        provides=DT, caught_by=[DEPENDS, AGREES])
class ActionReadFromReturnToken(DecisionTransformer):
    def state_tokens(self, x):
        return x[:, 0::3]


# -- the model: the token sequence ---------------------------------------------------------------------


@mutant(name="DecisionTransformer_tokens_in_wrong_order",
        bug="tokens interleaved as (s, R, a), the head still at 3i + 1", provides=DT, caught_by=[AGREES])
class TokensInWrongOrder(DecisionTransformer):
    def embed(self, returns_to_go, states, actions, timesteps):
        tokens = self.step_tokens(returns_to_go, states, actions)[:, :, [1, 0, 2]]  # (s, R, a)
        return rearrange(tokens + self.embed_timestep(timesteps)[:, :, None], "b j k d -> b (j k) d")


@mutant(name="DecisionTransformer_streams_concatenated",
        bug="the R, s and a streams are concatenated (R_0 .. R_j-1, s_0 .., a_0 ..), not interleaved per step",
        provides=DT, caught_by=[IGNORES, AGREES])
class StreamsConcatenated(DecisionTransformer):
    def embed(self, returns_to_go, states, actions, timesteps):
        tokens = self.step_tokens(returns_to_go, states, actions) + self.embed_timestep(timesteps)[:, :, None]
        return rearrange(tokens, "b j k d -> b (k j) d")  # torch.stack(..., dim=1).reshape without the permute


@mutant(name="DecisionTransformer_timestep_per_token_index",
        bug="the timestep table is indexed by token position 0 .. 3j - 1 (a positional embedding), not by timesteps",
        provides=DT, caught_by=[TIMESTEP, PADDED, AGREES])
class TimestepPerTokenIndex(DecisionTransformer):
    def embed(self, returns_to_go, states, actions, timesteps):
        tokens = rearrange(self.step_tokens(returns_to_go, states, actions), "b j k d -> b (j k) d")
        return tokens + self.embed_timestep(torch.arange(tokens.shape[1], device=tokens.device))


@mutant(name="DecisionTransformer_timestep_on_state_token_only", bug="the timestep embedding is added to s_i only",
        provides=DT, caught_by=[TIMESTEP, AGREES])
class TimestepOnStateTokenOnly(DecisionTransformer):
    def embed(self, returns_to_go, states, actions, timesteps):
        ret, state, action = self.step_tokens(returns_to_go, states, actions).unbind(2)
        tokens = torch.stack([ret, state + self.embed_timestep(timesteps), action], dim=2)
        return rearrange(tokens, "b j k d -> b (j k) d")


@mutant(name="DecisionTransformer_timesteps_of_first_trajectory",
        bug="the timestep embedding of trajectory 0 (embed_timestep(timesteps[0])) is broadcast to the batch",
        provides=DT, caught_by=[BATCH, AGREES])
class TimestepsOfFirstTrajectory(DecisionTransformer):
    def embed(self, returns_to_go, states, actions, timesteps):
        return super().embed(returns_to_go, states, actions, timesteps[:1].expand_as(timesteps))


# -- the model: masks and the head ---------------------------------------------------------------------


def _step_causal(n: int, device) -> torch.Tensor:
    """(n, n) True where token y's step <= token x's step: a causal mask over steps, not tokens."""
    step = torch.arange(n, device=device) // 3
    return step[:, None] >= step[None, :]


@mutant(name="DecisionTransformer_causal_mask_over_steps",
        bug="the causal mask is built over steps (a token sees its whole step), so s_i sees a_i",
        provides=DT, caught_by=[IGNORES])
class CausalMaskOverSteps(DecisionTransformer):
    def __init__(self, **kw):
        super().__init__(**kw)
        for layer in self.layers:
            attend = layer.self_attn.forward

            def over_steps(x, *, mask=None, causal=False, cache=None, attend=attend):
                steps = _step_causal(x.shape[1], x.device)
                return attend(x, mask=steps if mask is None else mask & steps, causal=False, cache=cache)

            layer.self_attn.forward = over_steps


@mutant(name="DecisionTransformer_padding_mask_ignored", bug="the step mask is accepted but padded tokens stay visible",
        provides=DT, caught_by=[PADDED])
class PaddingMaskIgnored(DecisionTransformer):
    def key_mask(self, mask):
        return None


@mutant(name="DecisionTransformer_padding_mask_tiled",
        bug="the step mask is tiled (mask.repeat(1, 3)) instead of repeated per token, so the wrong tokens are masked",
        provides=DT, caught_by=[PADDED])
class PaddingMaskTiled(DecisionTransformer):
    def key_mask(self, mask):
        return None if mask is None else repeat(mask.to(torch.bool), "b j -> b 1 1 (k j)", k=3)


@mutant(name="DecisionTransformer_continuous_actions_not_squashed",
        bug="continuous actions are returned raw although action_tanh=True", provides=DT, caught_by=[AGREES])
class ContinuousActionsNotSquashed(DecisionTransformer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.action_tanh = False
