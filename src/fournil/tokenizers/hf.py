"""A Hugging Face ``tokenizers`` tokenizer (byte-level BPE, SentencePiece-style) with its special tokens and chat template.

Saved the way Hugging Face saves one: ``tokenizer.json`` and, beside it, ``tokenizer_config.json`` (special
tokens, chat template), so a run directory's tokenizer is also an ``AutoTokenizer`` folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from fournil.errors import FournilError, NotAChatModel
from fournil.text import HALF_PAIR, is_text
from fournil.tokenizers.chat import render_chat

CONFIG_NAME = "tokenizer_config.json"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable characters a byte-level vocabulary is written in back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(shifted)}}


_BYTE_LEVEL = _byte_level_alphabet()


def not_text(texts: list[str], error: TypeError) -> Exception:
    """What the tokenizers library's TypeError about ``texts`` means: a str that is not text, or another mistake."""
    if all(not isinstance(t, str) or is_text(t) for t in texts):
        return error
    return FournilError(f"the text {HALF_PAIR}: decode it from UTF-8 (with errors='replace' if it may be broken)")


class HFTokenizer:
    def __init__(self, tokenizer, bos: str | None = None, eos: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None, pad: str | None = None):
        """``pad``: the token a batch of texts is padded with, for transformers (fournil pads by itself)."""
        self.tok = tokenizer
        self.bos, self.eos, self.add_bos, self.chat_template, self.pad = bos, eos, add_bos, chat_template, pad
        for name in (bos, eos):
            if name is not None and tokenizer.token_to_id(name) is None:
                raise FournilError(f"special token {name!r} is not in the tokenizer's vocabulary")
        self.specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"  # GPT-2 style: tokens written as bytes

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def boundary_id(self) -> int | None:
        return None  # documents are delimited by bos/eos in the text, not framed by the data loader

    @property
    def bos_id(self) -> int | None:
        return self.tok.token_to_id(self.bos) if self.bos else None

    @property
    def eos_id(self) -> int | None:
        return self.tok.token_to_id(self.eos) if self.eos else None

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end an answer: EOS, and the token the chat template closes an assistant turn with."""
        stops = {self.eos_id} - {None}
        if self.chat_template:
            marker = "\x00fournil\x00"
            text = render_chat(self.chat_template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                               add_generation_prompt=False, bos_token=self.bos or "", eos_token=self.eos or "")
            after = self.tok.encode(text.split(marker, 1)[-1], add_special_tokens=False).ids
            stops |= {i for i in after[:1] if self.tok.id_to_token(i) in self.specials}
        return stops

    def encode(self, text: str, strict: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids."""
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:
            raise not_text([text], e) from None

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once, in parallel on every core."""
        try:
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError as e:
            raise not_text(texts, e) from None

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, i: int) -> str:
        return self.tok.decode([i], skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes a token stands for, to count bytes and characters: exact for byte-level vocabularies, whose
        tokens may be parts of a character."""
        piece = self.tok.id_to_token(i)
        if piece in self.specials:  # the end of a document stands for a line end, as with characters
            return b"\n" if piece == self.eos else b""
        if self.byte_level and piece is not None and set(piece) <= _BYTE_LEVEL.keys():
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return self.token_text(i).encode("utf-8")

    def prompt_ids(self, text: str) -> list[int]:
        """What generation starts from: BOS if the model expects it, then the text (EOS alone if both are empty)."""
        ids = [self.bos_id] * bool(self.add_bos and self.bos) + self.encode(text)
        return ids or [self.eos_id if self.eos else 0]

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the chat template (ready for the assistant's answer, by default)."""
        if not self.chat_template:
            raise NotAChatModel
        return render_chat(self.chat_template, messages, add_generation_prompt, bos_token=self.bos or "",
                           eos_token=self.eos or "")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.chat_text(messages, add_generation_prompt))

    def save(self, path: Path) -> None:
        path = Path(path)
        self.tok.save(str(path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos, "eos_token": self.eos,
                  "add_bos_token": self.add_bos, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.pad:
            config["pad_token"] = self.pad
        (path.parent / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def from_files(cls, path: Path) -> "HFTokenizer":
        """``tokenizer.json`` and the ``tokenizer_config.json`` beside it, as a Hugging Face folder holds them."""
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library's message says what is malformed
            raise FournilError(f"{path} is not a valid Hugging Face tokenizer: {e}") from None
        cfg = {}
        if (path.parent / CONFIG_NAME).exists():
            cfg = json.loads((path.parent / CONFIG_NAME).read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if template is None and (path.parent / "chat_template.jinja").exists():
            template = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731  (AddedToken dicts in old files)
        add_bos = cfg.get("add_bos_token", _post_processor_adds_bos(tok, name(cfg.get("bos_token"))))
        return cls(tok, name(cfg.get("bos_token")), name(cfg.get("eos_token")), bool(add_bos), template)


def _post_processor_adds_bos(tok, bos: str | None) -> bool:
    """Whether encoding with special tokens puts BOS first (how Llama's tokenizer.json says it wants one)."""
    if not bos:
        return False
    ids = tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.token_to_id(bos)
