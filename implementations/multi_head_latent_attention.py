"""Multi-head latent attention (DeepSeek-V2) and its latent cache in PyTorch.
Spec: spec/multi_head_latent_attention.py.

The naive form and the absorbed inference form sit side by side in ``forward``; a property checks that
they agree. Letters: l = kv_rank, lq = q_rank, r = rope_dim, e = head_dim (spec's glossary extension).
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from implementations.normalization import RMSNorm
from implementations.sdpa import allowed_keys, scaled_dot_product_attention

__all__ = ["MultiHeadLatentAttention", "LatentKVCache"]

RMS_EPS = 1e-6


class LatentKVCache:
    """What MLA keeps per layer: the normalised latents (b, capacity, l) and the rotated shared keys
    (b, capacity, r), filled from the front; l + r numbers per token (DeepSeek-V2, Table 1)."""

    def __init__(
        self,
        *,
        batch_size: int,
        kv_rank: int,
        rope_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(batch_size, kv_rank, capacity) <= 0 or rope_dim < 0:
            raise ValueError(
                f"sizes must be positive (rope_dim >= 0): batch_size={batch_size}, kv_rank={kv_rank}, "
                f"rope_dim={rope_dim}, capacity={capacity}"
            )
        self.latents = torch.zeros(batch_size, capacity, kv_rank, dtype=dtype, device=device)
        self.rope_keys = torch.zeros(batch_size, capacity, rope_dim, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def update(self, latent: Tensor, rope_key: Tensor) -> tuple[Tensor, Tensor]:
        """Append latent (b, n, l) and rope_key (b, n, r) at positions length .. length + n - 1; return
        everything cached, (b, length, l) and (b, length, r)."""
        b, _, l = self.latents.shape
        r = self.rope_keys.shape[-1]
        n = latent.shape[1]
        if latent.shape != (b, n, l) or rope_key.shape != (b, n, r):
            raise ValueError(f"the cache holds latents (b, ·, l) = ({b}, ·, {l}) and rotated keys (b, ·, r) = "
                             f"({b}, ·, {r}); got {tuple(latent.shape)} and {tuple(rope_key.shape)}")
        if self.length + n > self.capacity:
            raise ValueError(f"latent cache capacity exceeded: {self.length} cached + {n} new > capacity {self.capacity}")
        self.latents[:, self.length : self.length + n] = latent
        self.rope_keys[:, self.length : self.length + n] = rope_key
        self.length += n
        return self.latents[:, : self.length], self.rope_keys[:, : self.length]

    def reset(self) -> None:
        self.length = 0

    @property
    def numbers_per_token(self) -> int:
        """l + r: the latent and the rotated shared key (MHA's cache holds 2 * n_head * head_dim)."""
        return self.latents.shape[-1] + self.rope_keys.shape[-1]


class MultiHeadLatentAttention(nn.Module):
    """Keys and values from one joint latent c_KV = RMSNorm(x W_dkv^T) of width kv_rank; queries from x
    or through a query latent of width q_rank; a decoupled RoPE part (a per-head rotated query, one
    rotated key shared by every head); scale 1/sqrt(head_dim + rope_dim)."""

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        head_dim: int,
        kv_rank: int,
        q_rank: int | None = None,
        rope_dim: int = 0,
        rotary: nn.Module | None = None,
        kv_norm: bool = True,
        q_norm: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if min(d_model, n_head, head_dim, kv_rank) <= 0 or (q_rank is not None and q_rank <= 0):
            raise ValueError(f"sizes must be positive: d_model={d_model}, n_head={n_head}, head_dim={head_dim}, "
                             f"kv_rank={kv_rank}, q_rank={q_rank}")
        if rope_dim < 0 or rope_dim % 2:
            raise ValueError(f"rope_dim={rope_dim} must be 0 or positive and even (RoPE rotates pairs)")
        if (rope_dim > 0) != (rotary is not None):
            raise ValueError(f"rope_dim={rope_dim} and rotary={type(rotary).__name__} must come together: the "
                             "decoupled RoPE part needs both (or neither)")
        if rotary is not None and getattr(rotary, "head_dim", rope_dim) != rope_dim:
            raise ValueError(f"rotary rotates head_dim={rotary.head_dim}, but rope_dim={rope_dim}")
        self.d_model, self.n_head, self.head_dim = d_model, n_head, head_dim
        self.kv_rank, self.q_rank, self.rope_dim = kv_rank, q_rank, rope_dim
        h, e, r = n_head, head_dim, rope_dim
        if q_rank is None:
            self.q = nn.Linear(d_model, h * e, bias=bias)
        else:
            self.q_down = nn.Linear(d_model, q_rank, bias=bias)
            self.q_norm = RMSNorm(d_model=q_rank, eps=RMS_EPS) if q_norm else None
            self.q_up = nn.Linear(q_rank, h * e, bias=bias)
        self.kv_down = nn.Linear(d_model, kv_rank, bias=bias)
        self.kv_norm = RMSNorm(d_model=kv_rank, eps=RMS_EPS) if kv_norm else None
        self.k_up = nn.Linear(kv_rank, h * e, bias=bias)
        self.v_up = nn.Linear(kv_rank, h * e, bias=bias)
        if r:
            self.q_rope = nn.Linear(d_model if q_rank is None else q_rank, h * r, bias=bias)
            self.k_rope = nn.Linear(d_model, r, bias=bias)
        self.o = nn.Linear(h * e, d_model, bias=bias)
        self.rotary = rotary

    @property
    def scale(self) -> float:
        """1/sqrt(e + r): a query/key head is its content part and its rotated part."""
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def queries(self, x: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
        """q^C (b, h, s, e) and the rotated q^R (b, h, s, r) at positions start .. start + s - 1 (or None)."""
        if self.q_rank is None:
            q_c, q_in = self.q(x), x
        else:
            q_in = self.q_down(x)  # c_Q (b, s, lq)
            if self.q_norm is not None:
                q_in = self.q_norm(q_in)
            q_c = self.q_up(q_in)
        q_c = rearrange(q_c, "b s (h e) -> b h s e", h=self.n_head)
        if not self.rope_dim:
            return q_c, None
        q_r = rearrange(self.q_rope(q_in), "b s (h r) -> b h s r", h=self.n_head)
        return q_c, self.rotary(q_r, offset=start)

    def latent_and_rope_key(self, x: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """c_KV (b, s, l), normalised; k^R (b, s, r) from x, rotated at its positions: what the cache keeps."""
        c = self.kv_down(x)
        if self.kv_norm is not None:
            c = self.kv_norm(c)
        if not self.rope_dim:
            return c, x.new_zeros(*x.shape[:2], 0)
        k_r = self.rotary(self.k_rope(x)[:, None], offset=start)[:, 0]  # (b, 1, s, r): one key for every head
        return c, k_r

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False,
        cache: LatentKVCache | None = None, absorbed: bool = False,
    ) -> Tensor:
        start = 0 if cache is None else cache.length  # absolute position of this chunk's first token
        q_c, q_r = self.queries(x, start)
        c, k_r = self.latent_and_rope_key(x, start)
        if cache is not None:
            c, k_r = cache.update(c, k_r)  # (b, start + s, l), (b, start + s, r)
        attend = self.attend_absorbed if absorbed else self.attend_naive
        return attend(q_c, q_r, c, k_r, mask=mask, causal=causal)

    def attend_naive(self, q_c, q_r, c, k_r, *, mask, causal) -> Tensor:
        """Up-project the latents to per-head keys and values, attend, project out."""
        h, e, r = self.n_head, self.head_dim, self.rope_dim
        k = rearrange(self.k_up(c), "b t (h e) -> b h t e", h=h)
        v = rearrange(self.v_up(c), "b t (h e) -> b h t e", h=h)
        q = q_c
        if r:
            q = torch.cat([q_c, q_r], dim=-1)  # (b, h, s, e + r)
            k = torch.cat([k, k_r[:, None].expand(-1, h, -1, -1)], dim=-1)  # the same k^R for every head
        # Bottom-right causal alignment: chunk query j (position start + j) sees keys 0 .. start + j.
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=self.scale)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))

    def latent_query(self, q_c: Tensor) -> Tensor:
        """W_uk folded into the query: <q_i, W_uk,i c> = <W_uk,i^T q_i, c>, (b, h, s, e) -> (b, h, s, l).
        The key bias b_uk adds <q_i, b_uk,i> to every score of a row, which softmax cancels: left out."""
        w_uk = rearrange(self.k_up.weight, "(h e) l -> h e l", h=self.n_head)  # head i owns rows i*e .. (i+1)*e - 1
        return einsum(q_c, w_uk, "b h s e, h e l -> b h s l")

    def attend_absorbed(self, q_c, q_r, c, k_r, *, mask, causal) -> Tensor:
        """Attend in the latent space: W_uk folded into the queries, W_uv into the output projection;
        the latents (and the cache) serve as one key/value head shared by every query head."""
        h = self.n_head
        w_uv = rearrange(self.v_up.weight, "(h e) l -> h e l", h=h)
        w_o = rearrange(self.o.weight, "d (h e) -> d h e", h=h)
        q, k = self.latent_query(q_c), c
        if self.rope_dim:
            q, k = torch.cat([q, q_r], dim=-1), torch.cat([c, k_r], dim=-1)  # (.., l + r)
        a = scaled_dot_product_attention(q, k[:, None], c[:, None], mask=mask, causal=causal,
                                         scale=self.scale)  # (b, h, s, l): one shared key/value head
        w_ov = einsum(w_o, w_uv, "d h e, h e l -> d h l")  # W_o,i W_uv,i
        out = einsum(a, w_ov, "b h s l, d h l -> b s d")
        if self.v_up.bias is not None:
            # The weights of a row sum to 1 (0 for a row with no allowed key), so b_uv passes through once.
            ob = einsum(w_o, rearrange(self.v_up.bias, "(h e) -> h e", h=h), "d h e, h e -> d h")
            b, s, t = q.shape[0], q.shape[-2], c.shape[1]
            allowed = allowed_keys(mask, causal, s, t, q.device)
            seen = torch.ones(b, h, s, dtype=q.dtype, device=q.device) if allowed is None else \
                allowed.expand(b, h, s, t).any(-1).to(q.dtype)  # (b, h, s): rows with an allowed key
            out = out + einsum(seen, ob, "b h s, d h -> b s d")
        return out + self.o.bias if self.o.bias is not None else out
