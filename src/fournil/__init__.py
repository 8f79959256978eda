"""fournil: build, train, measure and sample language models, from a bigram to a Transformer."""
from fournil.config import DataConfig, RunConfig, TrainConfig
from fournil.errors import FournilError
from fournil.runs import Run, load
from fournil.train import train

__version__ = "0.1.0"
__all__ = ["DataConfig", "FournilError", "Run", "RunConfig", "TrainConfig", "load", "train"]
