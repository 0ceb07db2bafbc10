"""PyTorch's own modules under the spec's names: ``--impl pytorch``.

These must pass every property that applies to them; a failure here is a bug in the suite (or a
documented convention difference, converted in the adapter). A component PyTorch lacks (or that the
installed torch lacks, like ``enable_gqa`` before 2.5) is simply not exported, so its properties skip.
"""

from spec.registry import export_families

_components = export_families(__name__, __path__)
globals().update(_components)
__all__ = sorted(_components)
