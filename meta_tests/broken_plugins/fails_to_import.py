"""A file that fails while it is imported."""

from implementations.normalization import LayerNorm  # noqa: F401

import einops_typo_that_does_not_exist  # noqa: E402, F401
