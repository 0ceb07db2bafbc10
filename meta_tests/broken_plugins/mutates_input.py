"""LayerNorm that centres its input in place (x -= mean): the caller's tensor changes."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        x -= x.mean(dim=-1, keepdim=True)
        return super().forward(x)
