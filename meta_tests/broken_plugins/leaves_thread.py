"""LayerNorm that starts a (non-daemon) worker thread that never finishes."""

import threading

from implementations.normalization import LayerNorm as Correct

_stop = threading.Event()


def keep_busy():
    _stop.wait()


class LayerNorm(Correct):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not any(t.name == "norm-prefetch" for t in threading.enumerate()):
            threading.Thread(target=keep_busy, name="norm-prefetch").start()
