"""Our clean-room PyTorch implementations, exported under the spec's component names.

Each family module (same stem as in spec/ and properties/) lists its components in ``__all__``; they are
all re-exported here, so ``pytest --impl implementations`` is the same as the default run's "ours".
"""

from spec.registry import export_families

_components = export_families(__name__, __path__)
globals().update(_components)
__all__ = sorted(_components)
