"""Producing text from a model: one engine, one set of sampling controls."""
from fournil.generate.engine import Completion, complete, score, stream
from fournil.generate.sampling import SamplingParams
from fournil.generate.scheduler import Busy, Piece, Request, Scheduler

__all__ = ["Busy", "Completion", "Piece", "Request", "SamplingParams", "Scheduler", "complete", "score", "stream"]
