"""LayerNorm whose constructor takes a positional size under another name: the suite builds with keywords."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def __init__(self, size, eps=1e-5, bias=True):
        super().__init__(d_model=size, eps=eps, bias=bias)
