"""Tokenizers: text to token ids and back, saved as ``tokenizer.json``."""
from fournil.tokenizers.char import CharTokenizer, load_tokenizer
from fournil.tokenizers.hf import HFTokenizer

__all__ = ["CharTokenizer", "HFTokenizer", "load_tokenizer"]
