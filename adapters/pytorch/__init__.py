"""PyTorch's own modules under the spec's names: ``--impl pytorch``.

These must pass every property that applies to them; a failure here is a bug in the suite (or a
documented convention difference, converted in the adapter). A component PyTorch lacks (or that the
installed torch lacks, like ``enable_gqa`` before 2.5) is simply not defined here, so its properties skip.
"""

from adapters.pytorch.attention import *  # noqa: F401,F403
