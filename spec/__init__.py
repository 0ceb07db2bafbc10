"""The specification: what every component must do, and an independent float64 reference.

Each module under ``spec/`` describes one family of components. For every component it gives, in this
order: signature, shapes, math, conventions, canonical parameters, and the properties that check it.
Its reference implementation is written in numpy (float64) with einops, apart from the torch code in
``implementations/``, so that it can judge that code.

Shape glossary (used in every docstring, comment and shape annotation of the project)
-------------------------------------------------------------------------------------
    b   batch
    s   query positions (the sequence being computed)
    t   key/value positions (the context attended to; t == s for self-attention)
    d   model width (d_model)
    h   query heads (n_head)
    g   key/value heads (n_kv_head); h % g == 0, and query head i reads KV head i // (h // g)
    e   head width (head_dim = d // h)
    f   feed-forward width
    n   vocabulary size
    c   classes (classification) or outputs (regression)
    m   routed experts (mixture of experts' n_experts);  k  experts chosen per token (top_k)
    l   key/value latent rank (multi-head latent attention's kv_rank, d_c);  lq  its query latent rank
        (q_rank, d_c');  r  its decoupled RoPE width (rope_dim, d_h^R)
    w   sliding window: the positions a query sees, itself included
    nb  blocks in a paged KV cache's pool (num_blocks);  pb  positions per block (block_size);
        mb  block-table width (blocks per sequence)
    kd  draft tokens proposed per round of speculative decoding (its ``k`` argument)
    i, o  a linear layer's input and output features (quantization, tensor parallelism)
    tp  tensor-parallel size (world_size: the ranks one layer is split over)
    j   Decision Transformer steps (the model reads 3j tokens: R, s, a per step);  ds  state width
        (state_dim);  da  action count (discrete) or width (continuous) (act_dim)
    ch  image channels;  ih, iw  image height and width;  p  patch side;  gh, gw  patch-grid rows and
        columns (a vision transformer has gh*gw patch tokens)

Project-wide conventions
------------------------
* Masks are boolean and True means "may attend" (the polarity of ``F.scaled_dot_product_attention``).
  ``nn.MultiheadAttention`` uses the opposite polarity; the adapter in ``adapters/pytorch`` converts.
* Causal masks align bottom-right: with s queries and t keys, query i sits at absolute position
  t - s + i and may see keys 0 .. t - s + i. This is what cached decoding needs; PyTorch's
  ``is_causal=True`` aligns top-left when s != t.
* A query row with no allowed key produces zeros (finite, never NaN), as SDPA does since torch 2.5.
"""

from spec.registry import COMPONENTS, Component, Option, Param, boolean, component, positive_float

__all__ = ["COMPONENTS", "Component", "Option", "Param", "boolean", "component", "positive_float"]


def _register_families() -> None:
    """Import every family module under spec/ (importing one registers its components)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "registry":
            importlib.import_module(f"spec.{info.name}")


_register_families()
