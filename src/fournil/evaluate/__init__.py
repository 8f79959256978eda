"""Measuring a model: likelihood metrics and per-token explanations."""
from fournil.evaluate.explain import explain_output, explain_text
from fournil.evaluate.metrics import evaluate_nll, output_scores

__all__ = ["evaluate_nll", "explain_output", "explain_text", "output_scores"]
