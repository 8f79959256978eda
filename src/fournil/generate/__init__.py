"""Producing text from a model."""
from fournil.generate.sampling import sample_ids, stream_ids, stream_text

__all__ = ["sample_ids", "stream_ids", "stream_text"]
