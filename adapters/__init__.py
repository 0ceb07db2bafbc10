"""Adapters that present other libraries' components under the spec's names."""
