"""Tokenizers: text to token ids and back, saved as ``tokenizer.json``."""
from fournil.tokenizers.char import CharTokenizer, load_tokenizer
from fournil.tokenizers.hf import HFTokenizer, is_text

__all__ = ["CharTokenizer", "HFTokenizer", "is_text", "load_tokenizer"]
