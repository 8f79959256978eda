"""Pictures of what a model does and how it learned."""
from fournil.plots.loss import plot_loss, plot_runs

__all__ = ["plot_loss", "plot_runs"]
