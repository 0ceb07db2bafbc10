"""LayerNorm whose forward ends the process."""

import sys

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        sys.exit(3)
