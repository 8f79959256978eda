"""Data: sources (bundled or files), splits, and batches of token ids."""
from fournil.data.batches import IGNORE, make_data
from fournil.data.corpus import Splits, infer_mode, load_splits
from fournil.data.sources import BUNDLED, read_text, resolve

__all__ = ["BUNDLED", "IGNORE", "Splits", "infer_mode", "load_splits", "make_data", "read_text", "resolve"]
