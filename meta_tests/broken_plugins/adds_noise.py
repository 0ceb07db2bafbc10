"""LayerNorm that adds a little noise to its output ("regularisation" left on outside training)."""

import torch

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 * torch.randn_like(out)
