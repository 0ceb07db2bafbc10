"""LayerNorm that divides by the standard deviation without eps and subtracts a row's own value: 0/0."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        out = super().forward(x)
        return out * (x - x) / (x - x)
