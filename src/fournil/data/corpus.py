"""Corpora and their train/val/test splits.

Three modes: ``lines`` (each non-empty line is a document, like a list of names), ``text`` (running text, later
cut into blocks of the context length) and ``pairs`` ((source, target) examples for sequence-to-sequence models).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from fournil.config import DataConfig, check_split
from fournil.data.pairs import is_pairs, pair_splits
from fournil.data.shards import is_prepared, open_shards
from fournil.data.sources import fingerprint, read_text, too_few_to_split
from fournil.errors import FournilError

MODES = ("auto", "lines", "text", "pairs")


def infer_mode(text: str) -> str:
    """``lines`` when the file reads like a list (short lines, almost no blank lines), else ``text``."""
    lines = text.strip("\n").split("\n")
    blank = sum(1 for line in lines if not line.strip())
    lengths = sorted(len(line) for line in lines)
    p99 = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    return "lines" if blank <= 0.01 * len(lines) and p99 <= 64 else "text"


@dataclass
class Splits:
    """The three splits: lists of documents in ``lines`` mode, strings (or token shards) in ``text`` mode, lists of
    (source, target) in ``pairs`` mode."""

    mode: str
    train: list[str] | str
    val: list[str] | str
    test: list[str] | str

    def items(self):
        return (("train", self.train), ("val", self.val), ("test", self.test))


def documents(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def load_splits(cfg: DataConfig) -> tuple[Splits, dict]:
    """Read and split the data as ``cfg`` says. Also returns fingerprints of the files read."""
    if cfg.mode not in MODES:
        raise FournilError(f"unknown data mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    explicit = [cfg.train, cfg.val, cfg.test]
    if any(explicit) and not all(explicit):
        missing = [f"--{n}" for n, v in zip(("train", "val", "test"), explicit) if not v]
        raise FournilError(f"explicit split files need all three of --train, --val, --test; missing {', '.join(missing)}")
    fractions = check_split(cfg.split)  # (pairs too: 0.3,0.3,0.3 gave the test split 40 %)
    if is_pairs(cfg.train or cfg.data):
        parts, fingerprints = pair_splits(cfg)
        return Splits("pairs", parts["train"], parts["val"], parts["test"]), fingerprints
    if cfg.mode == "pairs":
        raise FournilError(f"pairs data is a .jsonl, .parquet or .tsv file of (source, target) examples, or nombres; "
                           f"{cfg.train or cfg.data} is neither")
    if any(explicit):
        texts = {name: read_text(path) for name, path in zip(("train", "val", "test"), explicit)}
        mode = cfg.mode if cfg.mode != "auto" else infer_mode(texts["train"])
        parts = {k: (documents(t) if mode == "lines" else t) for k, t in texts.items()}
        for name, part in parts.items():
            if not part:
                raise FournilError(f"the --{name} file has no {'documents' if mode == 'lines' else 'text'}")
        return Splits(mode, parts["train"], parts["val"], parts["test"]), {k: fingerprint(t) for k, t in texts.items()}

    if is_prepared(cfg.data):  # token shards from `fournil prepare`: running text, already split and tokenized
        parts, fp = open_shards(cfg.data)
        return Splits("text", parts["train"], parts["val"], parts["test"]), {"data": fp}
    text = read_text(cfg.data)
    mode = cfg.mode if cfg.mode != "auto" else infer_mode(text)
    if mode == "lines":
        docs = documents(text)
        order = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(order)
        n_train, n_val = int(fractions[0] * len(docs)), int(fractions[1] * len(docs))
        if n_val == 0 or len(docs) - n_train - n_val == 0 or n_train == 0:
            raise too_few_to_split(cfg.data, len(docs), "document", fractions, " (lines)")
        pick = lambda idx: [docs[i] for i in idx]  # noqa: E731
        splits = Splits(
            mode, pick(order[:n_train]), pick(order[n_train : n_train + n_val]), pick(order[n_train + n_val :])
        )
    else:
        a = int(fractions[0] * len(text))
        b = a + int(fractions[1] * len(text))
        splits = Splits(mode, text[:a], text[a:b], text[b:])
    return splits, {"data": fingerprint(text)}

