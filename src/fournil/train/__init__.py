"""Training: the loop, objectives, checkpoints."""
from fournil.train.trainer import train

__all__ = ["train"]
