"""Tokenizers: text to token ids and back, saved as ``tokenizer.json``."""
from fournil.tokenizers.char import CharTokenizer, load_tokenizer

__all__ = ["CharTokenizer", "load_tokenizer"]
