"""How much a tokenizer compresses text, and where it cuts it: what a tokenizer page shows."""
from __future__ import annotations


def compression(tokenizer, texts) -> dict:
    """Characters, UTF-8 bytes and tokens of ``texts``, and bytes per token (higher: fewer, longer tokens)."""
    chars = nbytes = tokens = 0
    for text in texts:
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
        tokens += len(tokenizer.encode(text, strict=False))
    return {"chars": chars, "bytes": nbytes, "tokens": tokens, "bytes_per_token": nbytes / max(tokens, 1)}


def pieces(tokenizer, text: str) -> list[tuple[int, str]]:
    """Each token of ``text`` with what it stands for (:func:`piece`)."""
    return [(i, piece(tokenizer, i)) for i in tokenizer.encode(text)]


def piece(tokenizer, i: int) -> str:
    """What token ``i`` stands for; a token holding part of a character shows its bytes, ``<C3>``."""
    raw = piece_bytes(tokenizer, i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<{b:02X}>" for b in raw)


def piece_bytes(tokenizer, i: int) -> bytes:
    """The bytes token ``i`` stands for: its text's, or, for a token holding part of a character (of a byte-level
    BPE), that part, where its text alone is the replacement character, as for many tokens alike."""
    text = tokenizer.token_text(i)
    return tokenizer.token_bytes(i) if "\ufffd" in text else text.encode("utf-8")
