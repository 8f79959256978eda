"""Pictures of what a model does and how it learned."""
from fournil.plots.loss import plot_loss

__all__ = ["plot_loss"]
