"""LayerNorm that returns the output with a leading axis added."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        return super().forward(x).unsqueeze(0)
