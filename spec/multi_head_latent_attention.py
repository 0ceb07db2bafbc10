"""Multi-head latent attention (MLA; DeepSeek-V2 section 2.1, DeepSeek-V3 the same) and its latent cache.

Signatures (constructors are keyword-only)
-------------------------------------------
    MultiHeadLatentAttention(*, d_model, n_head, head_dim, kv_rank, q_rank=None, rope_dim=0, rotary=None,
                             kv_norm=True, q_norm=True, bias=False)
        .forward(x, *, mask=None, causal=False, cache=None, absorbed=False)
    LatentKVCache(*, batch_size, kv_rank, rope_dim, capacity, dtype=torch.float32, device="cpu")
        .update(latent, rope_key) -> (latents, rope_keys)   append, then return everything cached so far
        .length -> int (positions cached);  .latents (b, capacity, l);  .rope_keys (b, capacity, r)
``rotary`` is a RotaryEmbedding (spec/rotary_embedding.py) of head_dim = rope_dim: the decoupled RoPE part.
It comes with ``rope_dim`` > 0; without it rope_dim = 0 and MLA has no rotated part. ``absorbed=True``
computes the same function in the inference form (below). The suite passes the implementation's own
RotaryEmbedding, built with the base and pairing it offers; an implementation that defines none is judged
without the RoPE part (rope=False), and the property about relative positions is skipped.

Shapes (the glossary of spec/__init__.py, whose l, lq and r are this family's widths)
---------------------------------------------------------------------------
    l = kv_rank (d_c)      the joint key/value latent c_KV, the only content the cache keeps
    lq = q_rank (d_c')     the query latent c_Q (q_rank=None: no query compression)
    r = rope_dim (d_h^R)   the decoupled rotated part of each query head and of the one shared key
    e = head_dim (d_h)     content width of each query, key and value head; h * e need not equal d
    x (b, s, d);  mask bool, broadcastable to (b, h, s, t), t = cached + s;  out (b, s, d), x's dtype and device

Math (the naive form; h_t in the paper is x here; biases only with bias=True)
---------------------------------------------------------------------------
    queries, without compression:   q^C = x W_q^T                        (b, s, h*e)
                                    q^R = RoPE(x W_qr^T)                 (b, s, h*r)  per head, positions p
    queries, compressed (q_rank lq): c_Q = RMSNorm_q(x W_dq^T)          (b, s, lq)    (q_norm=False: no norm)
                                    q^C = c_Q W_uq^T,  q^R = RoPE(c_Q W_qr^T)
    keys and values:                c_KV = RMSNorm_kv(x W_dkv^T)         (b, s, l)    (kv_norm=False: no norm)
                                    k^C = c_KV W_uk^T,  v = c_KV W_uv^T  (b, t, h*e)  split into h heads
                                    k^R = RoPE(x W_kr^T)                 (b, t, r)    ONE key, shared by all heads
    head i:  q_i = [q^C_i ; q^R_i],  k_i = [k^C_i ; k^R]    (width e + r)
             a_i = scaled_dot_product_attention(q_i, k_i, v_i, mask, causal, scale = 1 / sqrt(e + r))
    out = merge_heads(a) W_o^T                              (b, s, h*e) -> (b, s, d)
RoPE rotates at the tokens' absolute positions p = cache.length + j (spec/kv_cache.py); heads are split as
``rearrange(y, "b s (h e) -> b h s e")``: head i owns rows i*e .. (i+1)*e - 1 of W_q, W_uq, W_uk, W_uv
(and rows i*r .. (i+1)*r - 1 of W_qr), columns i*e .. (i+1)*e - 1 of W_o. RMSNorm is spec/normalization's,
eps 1e-6, computed in float32 at least.

The absorbed (inference) form (``absorbed=True``): attend in the latent space, one shared "KV head"
    W_uk, W_uv per head: (h, e, l).  q^L_i = W_uk,i^T q^C_i  (b, h, s, l): W_uk folded into the query side
    a^L_i = scaled_dot_product_attention([q^L_i ; q^R_i], [c_KV ; k^R], c_KV, mask, causal, scale = 1 / sqrt(e + r))
    out = sum_i a^L_i (W_o,i W_uv,i)^T  (+ W_o,i b_uv,i where a key is allowed)  + b_o: W_uv folded into the output side
Equal to the naive form because <q^C_i, W_uk,i c> = <W_uk,i^T q^C_i, c> and the softmax weights sum to one.
The key bias b_uk adds <q^C_i, b_uk,i> to every score of a row, which softmax cancels: the absorbed form
drops it. With a cache the absorbed form reads the latents themselves: keys are never up-projected.

The latent cache
----------------
``cache.update(c_KV, k^R)`` appends the chunk's normalised latent (b, n, l) and its rotated shared key
(b, n, r), rotated at its true positions, and returns everything cached (b, length, l), (b, length, r).
Per token and layer it holds exactly l + r numbers (DeepSeek-V2, Table 1: (d_c + d_h^R) l), against
2 h e for MHA, 2 g e for GQA and 2 e for MQA (spec/grouped_query_attention.kv_size_per_token). DeepSeek-V2
sets l = 4e, r = e/2: 4.5 e per token, GQA with 2.25 groups.

Conventions (pinned, with the reason)
-------------------------------------
* The rotated key is computed from x (not from c_KV) and shared by every head; the query's rotated part
  is per head, from c_Q (or x). Why decoupled (DeepSeek-V2 section 2.1.3): RoPE on k^C puts a rotation
  that depends on the key's position between W_uk and the query, so W_uk could not be folded into the
  query side; RoPE on the latent c_KV rotates the values too (outputs then see absolute positions), and
  an absorbed form reading the unrotated latent no longer equals the naive one.
* Scale 1 / sqrt(e + r): the query/key width is content plus rotated part (DeepSeek's q_head_dim).
* Value head width = e (DeepSeek-V2/V3 use v_head_dim = qk_nope_head_dim).
* The cache holds c_KV after its RMSNorm (DeepSeek-V3's inference code, vLLM) and k^R after RoPE,
  never per-head keys or values; a chunk after a cache starts at position cache.length.
* Causal masks align bottom-right (spec/sdpa.py): with a cache, chunk query j sits at cache.length + j.
* No max_len; sizes must be positive (rope_dim >= 0, even when > 0, and equal to the RotaryEmbedding's
  head_dim; rope_dim > 0 needs rotary; q_rank None or positive): otherwise ValueError.

Options (declarable; properties/options.py)
-------------------------------------------
* ``q_rank`` (constructor): None (default: queries straight from x, as DeepSeek-V2-Lite) or the query
  latent width lq (DeepSeek-V2/V3 compress queries); any positive integer may be declared; the
  properties draw None, 3 and 8.
* ``kv_norm`` (constructor): True (default, as the reference models) normalises c_KV with an RMSNorm;
  False: none. ``q_norm`` (constructor): True (default) normalises c_Q (only with q_rank); False: none.
* ``bias`` (constructor): False (default; DeepSeek uses none) or True (every projection has a bias).
* ``rope`` (input): True (default) builds it with rope_dim > 0 and ``rotary``; False: rope_dim = 0.
* ``absorbed`` (input): True if the call takes ``absorbed=True`` (the absorbed inference form); called
  without it, the module computes the naive form. An input regime, not a call option: the two forms are
  the same function, so outputs that agree to the last bit are no sign of an ignored flag.
* ``mask`` (input), ``causal`` (call), ``cache`` (input; a LatentKVCache as ``cache=``): as the attention
  modules (spec/attention.py).

Canonical parameters (weights (out, in) as nn.Linear; ``.bias`` of each Linear with bias=True)
---------------------------------------------------------------------------------------------
    q_rank None:  q.weight (h*e, d)                      q_rope.weight (h*r, d)
    q_rank lq:    q_down.weight (lq, d)  q_norm.weight (lq,)  q_up.weight (h*e, lq)  q_rope.weight (h*r, lq)
    always:       kv_down.weight (l, d)  kv_norm.weight (l,)  k_up.weight (h*e, l)   v_up.weight (h*e, l)
                  k_rope.weight (r, d)   o.weight (d, h*e)
q_rope and k_rope exist with rope only; the norms' weights with q_norm / kv_norm only.

Properties (properties/test_multi_head_latent_attention.py)
-----------------------------------------------------------
agrees with this reference (float64; float32 and half by the error-ratio rule); the absorbed form equals
the naive form, whole or chunked with a cache; cached decoding (any split, one token at a time) equals
the full pass; the cache holds exactly l + r numbers per token and layer: the normalised latent and the
rotated shared key at their true positions; without norms and with the rotated query part zero, MLA
equals MHA with the product weights W_uq W_dq, W_uk W_dkv, W_uv W_dkv (low-rank MHA); each head is a
one-head MLA sharing the latent and the rotated key; causal; masked keys have no influence; batch elements
are independent; moving a sequence to later positions (behind masked tokens) changes nothing (RoPE sees
relative positions only); every parameter gets a finite gradient.
"""

from __future__ import annotations

import math

import numpy as np
from einops import rearrange

from spec.attention import MASK
from spec.normalization import rms_norm
from spec.registry import Component, Option, Param, boolean, component, same_shape_as_first_input
from spec.sdpa import scaled_dot_product_attention

RMS_EPS = 1e-6


def _rank(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


MLA_OPTIONS = (
    Option("q_rank", (None, 3, 8), "init", "None: queries from x; an int lq: through a rank-lq latent c_Q "
           "(DeepSeek-V2/V3)", accepts=_rank),
    boolean("kv_norm", "an RMSNorm on the key/value latent c_KV (False: none)", kind="init"),
    boolean("q_norm", "an RMSNorm on the query latent c_Q, with q_rank (False: none)", kind="init"),
    boolean("bias", "every projection has a bias (False: the weights alone, as DeepSeek)", default=False,
            kind="init"),
    boolean("rope", "the decoupled RoPE part: rope_dim > 0 with rotary= (False: rope_dim = 0)",
            argument="rotary"),
    boolean("absorbed", "the call takes absorbed=True: attend in the latent space, W_uk folded into the "
            "queries and W_uv into the output (without it: the naive form)", default=False, argument="absorbed"),
    MASK,
    Option("causal", (False, True), "call", "causal=True hides later positions (bottom-right aligned)"),
    boolean("cache", "the call takes a LatentKVCache as cache= (incremental decoding)", default=False,
            argument="cache"),
)


def mla_parameters(
    *, d_model: int, n_head: int, head_dim: int, kv_rank: int, q_rank: int | None = None, rope_dim: int = 0,
    kv_norm: bool = True, q_norm: bool = True, bias: bool = False, **_,
) -> dict[str, Param]:
    """The canonical parameters for a configuration (see the docstring's table)."""
    d, h, e, l, r = d_model, n_head, head_dim, kv_rank, rope_dim
    linears: list[tuple[str, int, int]] = []
    norms: list[tuple[str, int]] = []
    if q_rank is None:
        linears.append(("q", h * e, d))
        q_in = d
    else:
        linears += [("q_down", q_rank, d), ("q_up", h * e, q_rank)]
        norms += [("q_norm", q_rank)] if q_norm else []
        q_in = q_rank
    linears += [("kv_down", l, d), ("k_up", h * e, l), ("v_up", h * e, l)]
    norms += [("kv_norm", l)] if kv_norm else []
    if r:
        linears += [("q_rope", h * r, q_in), ("k_rope", r, d)]
    linears.append(("o", d, h * e))
    params = {}
    for name, rows, cols in linears:
        params[f"{name}.weight"] = Param((rows, cols))
        if bias:
            params[f"{name}.bias"] = Param((rows,), "bias")
    for name, width in norms:
        params[f"{name}.weight"] = Param((width,), "gain")
    return params


MULTI_HEAD_LATENT_ATTENTION = component(
    Component(
        name="MultiHeadLatentAttention",
        kind="module",
        family="multi_head_latent_attention",
        summary="multi-head latent attention (DeepSeek-V2): a joint key/value latent, decoupled RoPE",
        parameters=mla_parameters,
        output_shape=same_shape_as_first_input,
        options=MLA_OPTIONS,
    )
)
LATENT_KV_CACHE = component(
    Component(
        name="LatentKVCache",
        kind="class",
        family="multi_head_latent_attention",
        summary="per-layer MLA cache: latents (b, capacity, kv_rank) and rotated keys (b, capacity, rope_dim)",
    )
)


# ---------------------------------------------------------------------------------------------------
# Sizes (DeepSeek-V2, Table 1)


def mla_cache_numbers_per_token(*, kv_rank: int, rope_dim: int) -> int:
    """Numbers MLA caches per token and layer: the latent and the rotated shared key, d_c + d_h^R."""
    return kv_rank + rope_dim


def latent_cache_storage_shapes(*, batch_size: int, kv_rank: int, rope_dim: int, capacity: int):
    """(latents, rope_keys) storage shapes of a LatentKVCache."""
    return (batch_size, capacity, kv_rank), (batch_size, capacity, rope_dim)


# ---------------------------------------------------------------------------------------------------
# The float64 reference (numpy + einops, written apart from the torch code)


def _linear(p: dict[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    return x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)


def _norm(p: dict[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    return rms_norm({"weight": p[f"{name}.weight"]}, x, eps=RMS_EPS) if f"{name}.weight" in p else x


def _as64(params) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}


def latent(params, x) -> np.ndarray:
    """c_KV = RMSNorm_kv(x W_dkv^T + b_dkv) (b, s, l): what the cache keeps (kv_norm=False: no norm,
    i.e. no kv_norm.weight in params)."""
    p = _as64(params)
    return _norm(p, "kv_norm", _linear(p, "kv_down", np.asarray(x, dtype=np.float64)))


def rotated_key(params, x, *, rotary, offset: int = 0) -> np.ndarray:
    """k^R = RoPE(x W_kr^T + b_kr) at positions offset .. offset + s - 1, (b, s, r).

    ``rotary(a, offset=o)`` rotates a (b, h, s, r) array (spec.rotary_embedding.rotary_embedding)."""
    p = _as64(params)
    k = _linear(p, "k_rope", np.asarray(x, dtype=np.float64))[:, None]  # (b, 1, s, r)
    return rotary(k, offset=offset)[:, 0]


def multi_head_latent_attention(
    params, x, *, n_head: int, head_dim: int, rope_dim: int = 0, rotary=None, mask=None, causal: bool = False,
) -> np.ndarray:
    """The float64 reference, naive form, positions 0 .. s - 1. The configuration is read from ``params``
    (q_down present: query compression; q_norm/kv_norm weights present: the norms; biases present)."""
    p = _as64(params)
    x = np.asarray(x, dtype=np.float64)
    h, e, r = n_head, head_dim, rope_dim
    heads = lambda y, w: rearrange(y, "b s (h w) -> b h s w", h=h, w=w)  # noqa: E731
    q_in = _norm(p, "q_norm", _linear(p, "q_down", x)) if "q_down.weight" in p else x
    q = heads(_linear(p, "q_up" if "q_down.weight" in p else "q", q_in), e)  # (b, h, s, e)
    c = latent(p, x)  # (b, s, l)
    k = heads(c @ p["k_up.weight"].T + p.get("k_up.bias", 0.0), e)
    v = heads(c @ p["v_up.weight"].T + p.get("v_up.bias", 0.0), e)
    if r:
        q_r = rotary(heads(_linear(p, "q_rope", q_in), r), offset=0)  # per head (b, h, s, r)
        k_r = rotated_key(p, x, rotary=rotary)  # shared (b, s, r)
        q = np.concatenate([q, q_r], axis=-1)
        k = np.concatenate([k, np.broadcast_to(k_r[:, None], (*k.shape[:-1], r))], axis=-1)
    a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=1.0 / math.sqrt(e + r))
    return _linear(p, "o", rearrange(a, "b h s e -> b s (h e)"))


def low_rank_mha_parameters(params, *, n_head: int, head_dim: int, rope_dim: int = 0) -> dict[str, np.ndarray]:
    """The MHA parameters (spec/attention.py's q, k, v, o) that MLA without norms and without its rotated
    query part computes: q = W_uq W_dq (or W_q), k = W_uk W_dkv, v = W_uv W_dkv, o = W_o, biases carried
    through the products. The query is scaled by sqrt(e / (e + r)), so that MHA's 1/sqrt(e) is MLA's
    1/sqrt(e + r)."""
    p = _as64(params)
    if "kv_norm.weight" in p or "q_norm.weight" in p:
        raise ValueError("MLA with a latent norm is not a low-rank MHA")

    def product(up: str, down: str) -> tuple[np.ndarray, np.ndarray]:
        w = p[f"{up}.weight"] @ p[f"{down}.weight"]
        down_bias = p.get(f"{down}.bias", np.zeros(p[f"{down}.weight"].shape[0]))
        b = p[f"{up}.weight"] @ down_bias + p.get(f"{up}.bias", 0.0)
        return w, np.broadcast_to(b, w.shape[:1]).copy()

    if "q_down.weight" in p:
        wq, bq = product("q_up", "q_down")
    else:
        wq, bq = p["q.weight"], np.broadcast_to(p.get("q.bias", 0.0), p["q.weight"].shape[:1]).copy()
    shrink = math.sqrt(head_dim / (head_dim + rope_dim))
    wk, bk = product("k_up", "kv_down")
    wv, bv = product("v_up", "kv_down")
    out = {"q.weight": shrink * wq, "q.bias": shrink * bq, "k.weight": wk, "k.bias": bk, "v.weight": wv,
           "v.bias": bv, "o.weight": p["o.weight"],
           "o.bias": np.broadcast_to(p.get("o.bias", 0.0), p["o.weight"].shape[:1]).copy()}
    return out


def one_head_parameters(params, i: int, *, n_head: int, head_dim: int, rope_dim: int = 0) -> dict[str, np.ndarray]:
    """Head i of an MLA as a one-head MLA: its rows of the per-head projections (q or q_up, q_rope, k_up,
    v_up) and its columns of o; the latent projections, norms and the shared rotated key unchanged."""
    e, r = head_dim, rope_dim
    out = {}
    for name, value in params.items():
        layer, kind = name.rsplit(".", 1)
        if layer in ("q", "q_up", "k_up", "v_up"):
            value = value[i * e : (i + 1) * e]
        elif layer == "q_rope":
            value = value[i * r : (i + 1) * r]
        elif layer == "o" and kind == "weight":
            value = value[:, i * e : (i + 1) * e]
        out[name] = value
    return out
