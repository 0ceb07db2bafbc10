"""PyTorch's transformer layers under the spec's names: ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer``. Spec: spec/layers.py.

Conventions converted here (and only here):
* Masks: the spec's True = may attend becomes PyTorch's True = masked. A spec mask broadcastable to
  (b, h, s, t) is expanded and passed as the per-head attention mask (b*h, s, t) that
  ``nn.MultiheadAttention`` accepts, so any spec mask (padding or not) reaches torch unchanged.
* The decoder's self-attention is always causal: an explicit lower-triangular mask (s == t here, so the
  spec's bottom-right alignment and torch's top-left one coincide) joined with the caller's mask.
* ``DecoderLayer(cross_attention=False)`` (decoder-only, GPT-style) is ``nn.TransformerEncoderLayer``
  with that causal mask: this is how decoder-only models are built from PyTorch's modules.
* Canonical names: ``self_attn.{q,k,v}`` are the thirds of ``self_attn.in_proj_weight`` / ``in_proj_bias``
  (q, then k, then v) and ``self_attn.o`` is ``self_attn.out_proj``; likewise ``cross_attn`` is
  ``multihead_attn``; ``ff.up`` = ``linear1``, ``ff.down`` = ``linear2``; ``self_attn_norm`` = ``norm1``,
  ``cross_attn_norm`` = ``norm2`` (decoder) and ``ff_norm`` = the last norm (``norm2`` or ``norm3``).
* Dropout: ``nn.Transformer*Layer`` also drops inside the feed-forward (after the activation), in
  training mode only; eval mode is what the agreement properties compare.

What PyTorch's layers offer is declared in ``spec_options`` (properties/options.py): relu and gelu but
not SwiGLU, LayerNorm only, no grouped-query attention (``n_kv_head``), no ``rotary``, no KV ``cache``.
The properties draw only what is declared and skip, naming the option, those that need the rest. Asked
for anyway, the constructor raises ValueError ("... not supported by nn.Transformer*Layer").
``bias=False`` is torch's own: no bias in any Linear or LayerNorm, so the canonical parameters have none.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["DecoderLayer", "EncoderLayer"]

UNSUPPORTED = "not supported by nn.Transformer*Layer"


def _torch_attention_mask(allowed: Tensor | None, *, b: int, h: int, s: int, t: int) -> Tensor | None:
    """Spec mask (True = may attend, broadcastable to (b, h, s, t)) -> torch's (b*h, s, t), True = masked."""
    if allowed is None:
        return None
    allowed = torch.as_tensor(allowed).to(dtype=torch.bool)
    return ~rearrange(allowed.expand(b, h, s, t), "b h s t -> (b h) s t")


def _with_causal(mask: Tensor | None, s: int, device: torch.device) -> Tensor:
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    return causal if mask is None else torch.as_tensor(mask, device=device).to(torch.bool) & causal


def _split_attention(mha: nn.MultiheadAttention) -> dict[str, Tensor]:
    wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
    state = {"q.weight": wq, "k.weight": wk, "v.weight": wv, "o.weight": mha.out_proj.weight}
    if mha.in_proj_bias is not None:  # bias=False: the weights alone
        bq, bk, bv = mha.in_proj_bias.chunk(3, dim=0)
        state |= {"q.bias": bq, "k.bias": bk, "v.bias": bv, "o.bias": mha.out_proj.bias}
    return state


def _load_attention(mha: nn.MultiheadAttention, params: dict[str, Tensor], prefix: str) -> None:
    p = {name[len(prefix) + 1 :]: value for name, value in params.items() if name.startswith(prefix + ".")}
    mha.in_proj_weight.copy_(torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]]))
    mha.out_proj.weight.copy_(p["o.weight"])
    if mha.in_proj_bias is not None:
        mha.in_proj_bias.copy_(torch.cat([p["q.bias"], p["k.bias"], p["v.bias"]]))
        mha.out_proj.bias.copy_(p["o.bias"])


def _affine(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    """``prefix.weight`` and, unless the module is bias-free, ``prefix.bias``."""
    state = {f"{prefix}.weight": module.weight}
    if module.bias is not None:
        state[f"{prefix}.bias"] = module.bias
    return state


def _check_activation(activation: str) -> None:
    if activation == "swiglu":
        raise ValueError(f"activation='swiglu' is {UNSUPPORTED} (relu and gelu only)")
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be relu or gelu, got {activation!r}")


class _TorchLayer(nn.Module):
    """Shared canonical-name mapping; ``self.layer`` is the wrapped nn.Transformer*Layer."""

    layer: nn.Module
    # canonical prefix -> the wrapped layer's submodule name (nn.TransformerEncoderLayer's, by default)
    attention_names: dict[str, str]
    norm_names: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.attention_names = {"self_attn": "self_attn"}
        self.norm_names = {"self_attn_norm": "norm1", "ff_norm": "norm2"}

    def canonical_state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for prefix, name in self.attention_names.items():
            state |= {f"{prefix}.{k}": v for k, v in _split_attention(getattr(self.layer, name)).items()}
        state |= _affine("ff.up", self.layer.linear1) | _affine("ff.down", self.layer.linear2)
        for prefix, name in self.norm_names.items():
            state |= _affine(prefix, getattr(self.layer, name))
        return state

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for prefix, name in self.attention_names.items():
            _load_attention(getattr(self.layer, name), params, prefix)
        state = self.canonical_state_dict()
        attention = tuple(f"{prefix}." for prefix in self.attention_names)  # loaded above, fused
        for name, value in params.items():
            if not name.startswith(attention):
                state[name].copy_(value)


class EncoderLayer(_TorchLayer):
    """``nn.TransformerEncoderLayer(batch_first=True)`` with the spec's keywords, names and mask polarity."""

    spec_options = {"activation": ("relu", "gelu")}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, norm_first: bool = False, dropout: float = 0.0,
                 activation: str = "relu", eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        _check_activation(activation)
        self.n_head = n_head
        self.layer = nn.TransformerEncoderLayer(
            d_model, n_head, dim_feedforward=d_ff, dropout=dropout, activation=activation, layer_norm_eps=eps,
            batch_first=True, norm_first=norm_first, bias=bias,
        )

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        b, s, _ = x.shape
        src_mask = _torch_attention_mask(mask, b=b, h=self.n_head, s=s, t=s)
        return self.layer(x, src_mask=src_mask)


class DecoderLayer(_TorchLayer):
    """``nn.TransformerDecoderLayer(batch_first=True)`` (cross_attention=True), or, decoder-only
    (cross_attention=False), ``nn.TransformerEncoderLayer`` with a causal mask."""

    spec_options = {"activation": ("relu", "gelu"), "norm": "layer", "n_kv_head": False, "rotary": False,
                    "cache": False}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, n_kv_head: int | None = None,
                 cross_attention: bool = True, norm_first: bool = False, dropout: float = 0.0,
                 activation: str = "relu", norm: str = "layer", eps: float = 1e-5, bias: bool = True,
                 rotary: nn.Module | None = None) -> None:
        super().__init__()
        _check_activation(activation)
        if norm != "layer":
            raise ValueError(f"norm={norm!r} is {UNSUPPORTED} (LayerNorm only)")
        if n_kv_head is not None:
            raise ValueError(f"n_kv_head={n_kv_head} (grouped-query attention) is {UNSUPPORTED}")
        if rotary is not None:
            raise ValueError(f"rotary position embeddings are {UNSUPPORTED}")
        self.n_head, self.cross_attention = n_head, cross_attention
        kwargs = {"dim_feedforward": d_ff, "dropout": dropout, "activation": activation, "layer_norm_eps": eps,
                  "batch_first": True, "norm_first": norm_first, "bias": bias}
        if cross_attention:
            self.layer = nn.TransformerDecoderLayer(d_model, n_head, **kwargs)
            self.attention_names = {"self_attn": "self_attn", "cross_attn": "multihead_attn"}
            self.norm_names = {"self_attn_norm": "norm1", "cross_attn_norm": "norm2", "ff_norm": "norm3"}
        else:
            self.layer = nn.TransformerEncoderLayer(d_model, n_head, **kwargs)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, mask: Tensor | None = None,
                memory_mask: Tensor | None = None, cache=None) -> Tensor:
        if cache is not None:
            raise ValueError(f"a KV cache is {UNSUPPORTED}")
        b, s, _ = x.shape
        self_mask = _torch_attention_mask(_with_causal(mask, s, x.device), b=b, h=self.n_head, s=s, t=s)
        if not self.cross_attention:
            return self.layer(x, src_mask=self_mask)
        if memory is None:
            raise ValueError("this DecoderLayer has cross-attention: pass the encoder's memory")
        t = memory.shape[1]
        cross_mask = _torch_attention_mask(memory_mask, b=b, h=self.n_head, s=s, t=t)
        return self.layer(x, memory, tgt_mask=self_mask, memory_mask=cross_mask)
