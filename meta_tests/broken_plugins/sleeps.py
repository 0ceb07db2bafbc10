"""LayerNorm whose forward waits far longer than any call may take."""

import time

from implementations.normalization import LayerNorm as Correct


class LayerNorm(Correct):
    def forward(self, x):
        time.sleep(60)
        return super().forward(x)
