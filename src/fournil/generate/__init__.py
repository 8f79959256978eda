"""Producing text from a model: one engine, one set of sampling controls."""
from fournil.generate.engine import Completion, Piece, complete, generate_steps, score, stream
from fournil.generate.sampling import SamplingParams

__all__ = ["Completion", "Piece", "SamplingParams", "complete", "generate_steps", "score", "stream"]
