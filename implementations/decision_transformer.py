"""The Decision Transformer and its returns-to-go in PyTorch. Spec: spec/decision_transformer.py."""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from implementations.layers import DecoderLayer, make_norm

__all__ = ["returns_to_go", "DecisionTransformer"]

ACTION_SPACES = ("discrete", "continuous")
EPS = 1e-5


def returns_to_go(rewards: Tensor, *, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """rtg[:, i] = rewards[:, i] + gamma * rtg[:, i + 1], 0 after the last step; (b, j) -> (b, j).

    A padded step (mask False) gets 0 and ends the sum (``where``: its reward is never read).
    Example, gamma = 1: rewards [1, 0, 2] -> [3, 2, 2].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (b, j), got shape {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if mask is not None and mask.shape != rewards.shape:
        raise ValueError(f"mask must be (b, j) = {tuple(rewards.shape)}, got {tuple(mask.shape)}")
    ahead = torch.zeros_like(rewards[:, 0])  # the return after the last step
    backwards = []
    for i in reversed(range(rewards.shape[1])):
        ahead = rewards[:, i] + gamma * ahead
        if mask is not None:
            ahead = torch.where(mask[:, i].to(torch.bool), ahead, torch.zeros_like(ahead))
        backwards.append(ahead)
    return torch.stack(backwards[::-1], dim=1)


class DecisionTransformer(nn.Module):
    """Return-conditioned action prediction: each step is three tokens (R_i, s_i, a_i), each plus the step's
    timestep embedding; pre-norm causal DecoderLayers over the 3j tokens; the action of step i is read
    from the hidden state of s_i (logits for discrete actions; tanh-squashed continuous ones)."""

    def __init__(
        self,
        *,
        state_dim: int,
        act_dim: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        max_timestep: int,
        d_ff: int | None = None,
        action_space: str = "discrete",
        action_tanh: bool = True,
    ) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        if min(state_dim, act_dim, d_model, n_layer, n_head, max_timestep, d_ff) <= 0:
            raise ValueError(
                f"sizes must be positive: state_dim={state_dim}, act_dim={act_dim}, d_model={d_model}, "
                f"n_layer={n_layer}, n_head={n_head}, max_timestep={max_timestep}, d_ff={d_ff}"
            )
        if action_space not in ACTION_SPACES:
            raise ValueError(f"action_space must be one of {ACTION_SPACES}, got {action_space!r}")
        self.state_dim, self.act_dim, self.max_timestep = state_dim, act_dim, max_timestep
        self.discrete = action_space == "discrete"
        self.action_tanh = action_tanh and not self.discrete

        self.embed_timestep = nn.Embedding(max_timestep, d_model)
        self.embed_return = nn.Linear(1, d_model)
        self.embed_state = nn.Linear(state_dim, d_model)
        self.embed_action = nn.Embedding(act_dim, d_model) if self.discrete else nn.Linear(act_dim, d_model)
        self.embed_ln = make_norm(d_model=d_model, norm="layer", eps=EPS)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, cross_attention=False, norm_first=True,
                         activation="gelu", norm="layer", eps=EPS)
            for _ in range(n_layer)
        )
        self.final_norm = make_norm(d_model=d_model, norm="layer", eps=EPS)
        self.predict_action = nn.Linear(d_model, act_dim)

    # -- pieces (small methods, so each step of the math has one place) ---------------------------------

    def step_tokens(self, returns_to_go: Tensor, states: Tensor, actions: Tensor) -> Tensor:
        """The embeddings of R_i, s_i and a_i, before the timestep: (b, j, 3, d)."""
        return torch.stack([self.embed_return(returns_to_go), self.embed_state(states), self.embed_action(actions)],
                           dim=2)

    def embed(self, returns_to_go: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor) -> Tensor:
        """The token sequence (b, 3j, d): R_0, s_0, a_0, R_1, ..., each plus its step's timestep embedding."""
        time = self.embed_timestep(timesteps)  # (b, j, d): one row per step, shared by its three tokens
        tokens = self.step_tokens(returns_to_go, states, actions) + time[:, :, None]  # (b, j, 3, d)
        return rearrange(tokens, "b j k d -> b (j k) d")  # interleaved: token 3i + k is kind k of step i

    def key_mask(self, mask: Tensor | None) -> Tensor | None:
        """The step mask (b, j) as a key padding mask over the tokens, (b, 1, 1, 3j)."""
        return None if mask is None else repeat(mask.to(torch.bool), "b j -> b 1 1 (j k)", k=3)

    def state_tokens(self, x: Tensor) -> Tensor:
        """The hidden states the actions are read from: those of s_i, tokens 3i + 1. (b, 3j, d) -> (b, j, d)"""
        return x[:, 1::3]

    # -- the model --------------------------------------------------------------------------------------

    def forward(
        self,
        returns_to_go: Tensor,
        states: Tensor,
        actions: Tensor,
        timesteps: Tensor,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, j = timesteps.shape
        want_actions = (b, j) if self.discrete else (b, j, self.act_dim)
        if (tuple(returns_to_go.shape) != (b, j, 1) or tuple(states.shape) != (b, j, self.state_dim)
                or tuple(actions.shape) != want_actions):
            raise ValueError(
                f"expected returns_to_go (b, j, 1) = {(b, j, 1)}, states {(b, j, self.state_dim)}, actions "
                f"{want_actions}; got {tuple(returns_to_go.shape)}, {tuple(states.shape)}, {tuple(actions.shape)}"
            )
        if mask is not None and tuple(mask.shape) != (b, j):
            raise ValueError(f"mask must be (b, j) = {(b, j)}, got {tuple(mask.shape)}")
        if timesteps.numel() and not 0 <= int(timesteps.min()) <= int(timesteps.max()) < self.max_timestep:
            raise ValueError(f"timesteps must lie in 0 .. {self.max_timestep - 1} (max_timestep={self.max_timestep}), "
                             f"got {int(timesteps.min())} .. {int(timesteps.max())}")
        x = self.embed_ln(self.embed(returns_to_go, states, actions, timesteps))
        keys = self.key_mask(mask)
        for layer in self.layers:
            x = layer(x, mask=keys)  # causal over the 3j tokens (DecoderLayer's self-attention)
        out = self.predict_action(self.state_tokens(self.final_norm(x)))  # (b, j, da)
        return torch.tanh(out) if self.action_tanh else out
