"""LayerNorm that returns (output, statistics) instead of the output alone."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        return super().forward(x), x.mean(dim=-1)
