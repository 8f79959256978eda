"""Producing text from a model."""
from fournil.generate.sampling import sample_ids

__all__ = ["sample_ids"]
