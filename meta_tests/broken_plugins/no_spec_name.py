"""A LayerNorm under the learner's own name: the suite finds none of the spec's names."""

from implementations.normalization import LayerNorm as MyLayerNorm  # noqa: F401
