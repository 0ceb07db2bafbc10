"""LayerNorm that caches its first result and returns it for every later call."""

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        if getattr(self, "_cached", None) is None:
            self._cached = super().forward(x)
        return self._cached
