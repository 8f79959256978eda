"""fournil: build, train, measure and sample language models, from a bigram to a Transformer."""
from fournil.config import AlignConfig, DataConfig, DistillConfig, LoraConfig, RunConfig, TrainConfig
from fournil.errors import FournilError
from fournil.runs import Run, load
from fournil.train import train
from fournil.train.distill import distill
from fournil.train.finetune import finetune

__version__ = "0.1.0"
__all__ = ["AlignConfig", "DataConfig", "DistillConfig", "FournilError", "LoraConfig", "Run", "RunConfig",
           "TrainConfig", "distill", "finetune", "load", "train"]
