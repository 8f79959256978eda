"""A character-level tokenizer: one token per character seen in the training split."""
from __future__ import annotations

import json
from pathlib import Path

from fournil.errors import FournilError, NotAChatModel

BOUNDARY = "<|endoftext|>"  # marks where a document starts and ends, like makemore's '.'
UNKNOWN = "<|unk|>"  # stands for characters of the val/test splits that training never saw
SPACE = "\u2581"  # a space as SentencePiece, and so a GGUF file, spells it
SPACES_SPELLED = {"type": "Sequence",  # the normalizer of a GGUF file's pieces read back (spaces are not in them)
                  "normalizers": [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}


class CharTokenizer:
    """Special tokens take the first ids, then the characters in sorted order."""

    chat_template = None  # (a character model is not a chat model)

    def __init__(self, chars: list[str], specials: list[str] | None = None):
        self.specials = list(specials or [])
        self.chars = list(chars)
        self.itos = self.specials + self.chars
        self.stoi = {c: i for i, c in enumerate(self.chars, start=len(self.specials))}

    @classmethod
    def train(cls, texts, boundary: bool, unknown: bool = False) -> "CharTokenizer":
        """Build the vocabulary from the training texts; ``boundary`` adds the document boundary token,
        ``unknown`` a token for characters outside the vocabulary."""
        chars = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars), [BOUNDARY] * boundary + [UNKNOWN] * unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def boundary_id(self) -> int | None:
        return self.itos.index(BOUNDARY) if BOUNDARY in self.specials else None

    @property
    def bos_id(self) -> int | None:
        return self.boundary_id  # a document starts and ends with the boundary

    @property
    def eos_id(self) -> int | None:
        return self.boundary_id

    def encode(self, text: str, strict: bool = True) -> list[int]:
        """Token ids; an unknown character is an error, or the unknown token when not ``strict`` and there is one."""
        if not strict and UNKNOWN in self.specials:
            unk = self.itos.index(UNKNOWN)
            return [self.stoi.get(c, unk) for c in text]
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:12]) + f" and {len(unknown) - 12} more" * (len(unknown) > 12)
            lower = text.lower()  # a names model learnt lowercase names: 'Zoé' is 'zoé' to it
            them = "it" if len(unknown) == 1 else "them"
            fix = f"try {lower!r}" if all(c in self.stoi for c in lower) else f"remove or replace {them}"
            raise FournilError(
                f"{shown} {'is' if len(unknown) == 1 else 'are'} not in the model's vocabulary "
                f"(it knows {len(self.chars)} characters seen in training); {fix}"
            ) from None

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @property
    def stop_ids(self) -> set[int]:
        return {self.boundary_id} - {None}

    def prompt_ids(self, text: str) -> list[int]:
        """What generation starts from: the boundary then the text (``lines``), or the text or a newline (``text``)."""
        ids = self.encode(text)
        if self.boundary_id is not None:
            return [self.boundary_id, *ids]
        return ids or self.encode("\n" if "\n" in self.stoi else self.chars[0])

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise NotAChatModel

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if self.itos[i] not in self.specials)

    def token_text(self, i: int) -> str:
        """What one token stands for in the text; the boundary stands for the end of a line."""
        return {BOUNDARY: "\n", UNKNOWN: "?"}.get(self.itos[i], self.itos[i])

    def token_bytes(self, i: int) -> bytes:
        return self.token_text(i).encode("utf-8")

    def save(self, path: Path) -> None:
        data = {"type": "char", "specials": self.specials, "chars": self.chars}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        return cls(data["chars"], data["specials"])


def load_tokenizer(path: Path):
    """A character tokenizer (fournil's format) or a Hugging Face one (its ``tokenizer.json``, or a folder holding it)."""
    from fournil.tokenizers.hf import HFTokenizer

    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FournilError(f"{path} holds no tokenizer.json: give a tokenizer.json, or a folder with one (a run, "
                               f"a Hugging Face model, what fournil tokenizer train writes)")
        path = path / "tokenizer.json"
    elif not path.exists():
        raise FournilError(f"no tokenizer {path}: no such file or folder; give a tokenizer.json, or a folder with one")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FournilError(f"cannot read the tokenizer {path}: {e}") from None
    if data.get("type") == "char":
        return CharTokenizer.from_dict(data)
    if "model" in data:
        return as_characters(HFTokenizer.from_files(path))
    raise FournilError(f"{path} is neither a fournil character tokenizer nor a Hugging Face tokenizer.json")


def as_characters(tokenizer):
    """A character model's tokenizer, as fournil writes it to a Hugging Face folder or a GGUF file (a BPE without
    merges, its specials first), read back as what it was: a character tokenizer frames each line with the boundary,
    as the model learned them, and refuses a character it does not know, which the BPE would drop without a word.
    Any other tokenizer is returned as it is."""
    spec = json.loads(tokenizer.tok.to_str())
    model, spelled = spec["model"], spec.get("normalizer") == SPACES_SPELLED
    if (model.get("type") != "BPE" or model.get("merges") or model.get("byte_fallback") or spec.get("pre_tokenizer")
            or spec.get("normalizer") not in (None, SPACES_SPELLED)):
        return tokenizer
    itos = [tokenizer.tok.id_to_token(i) for i in range(tokenizer.vocab_size)]
    first = next((i for i, t in enumerate(itos) if t not in (BOUNDARY, UNKNOWN)), len(itos))
    specials, chars = itos[:first], [t.replace(SPACE, " ") if spelled else t for t in itos[first:]]
    framed = BOUNDARY not in specials or tokenizer.bos == tokenizer.eos == BOUNDARY
    if set(specials) != tokenizer.specials or not framed or any(len(c) != 1 for c in chars) or \
            len(set(chars)) < len(chars):
        return tokenizer
    return CharTokenizer(chars, specials)
