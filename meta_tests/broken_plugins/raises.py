"""LayerNorm whose forward raises."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        raise RuntimeError("normalise me later")
