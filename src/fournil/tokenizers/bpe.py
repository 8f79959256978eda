"""Byte-level BPE trained on the user's corpus with Hugging Face ``tokenizers``, the way GPT-4's tokenizer is built.

Text is first split by GPT-4's pattern (words with their leading space, runs of at most three digits, punctuation,
whitespace), then each piece is read as UTF-8 bytes and pairs of tokens are merged, most frequent first, until the
vocabulary has the size asked for. Every byte is in the vocabulary, so any text encodes. Three special tokens:
``<|endoftext|>`` frames documents, ``<|im_start|>`` and ``<|im_end|>`` frame chat turns (ChatML).
"""
from __future__ import annotations

import sys

from pathlib import Path

from fournil.errors import FournilError
from fournil.tokenizers.hf import HFTokenizer

GPT4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DOCUMENT, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [DOCUMENT, TURN_START, TURN_END]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMALLEST = 256 + len(SPECIALS)  # every byte, and the special tokens


def bpe_size(spec: str) -> int | None:
    """N for a tokenizer spec ``bpe:N``; None for any other spec (``bpe`` alone is a tokenizer saved there, if any)."""
    if spec == "bpe" and not Path(spec).exists():
        raise FournilError("--tokenizer bpe: write bpe:N with N the vocabulary size, e.g. bpe:1024")
    if not spec.startswith("bpe:"):
        return None
    if not spec[4:].isdigit():
        raise FournilError(f"--tokenizer {spec}: write bpe:N with N the vocabulary size, e.g. bpe:1024")
    return int(spec[4:])


def train_bpe(texts, vocab_size: int, progress: bool = False, asked: str = "--vocab-size {}") -> HFTokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens learned from ``texts`` (an iterable of strings). Its
    ``progress`` bars are drawn on a terminal only: elsewhere the trainer writes empty lines to stdout. ``asked``: the
    flag that asked for the size, as an error tells to give it again."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < SMALLEST:
        raise FournilError(f"a vocabulary of {vocab_size} tokens is too small: a byte-level BPE needs at least {SMALLEST} "
                           f"(256 bytes and {len(SPECIALS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  show_progress=progress and sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if (most := tok.get_vocab_size()) < vocab_size:
        raise FournilError(f"this corpus supports at most {most} tokens (every pair of tokens that occurs in it has "
                           f"been merged): ask for {asked.format(most)} or less, or give more text")
    # transformers encodes with the post-processor: start each text with <|endoftext|>, as fournil does
    tok.post_processor = processors.TemplateProcessing(single=f"{DOCUMENT} $A", special_tokens=[(DOCUMENT, tok.token_to_id(DOCUMENT))])
    return HFTokenizer(tok, bos=DOCUMENT, eos=DOCUMENT, add_bos=True, chat_template=CHATML)
