"""Paired data for sequence-to-sequence models: (source, target) examples from JSONL or TSV files, or made by code
(``nombres``), split by examples, and their batches of (source, target input, target output) token ids."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fournil.data.batches import IGNORE, frame_ids, thinned
from fournil.data.instructions import other_kind, read_rows
from fournil.data.nombres import as_source, nombres, practised
from fournil.data.sources import fingerprint, holds_documents, read_text, too_few_to_split
from fournil.errors import FournilError

GENERATED = {"nombres": nombres}  # tasks made by code: no file, no download
PRACTISED = {"nombres": practised}  # a task made by code: the training pairs it repeats
AS_SOURCE = {"nombres": as_source}  # a source typed by a person, written as the task writes its sources
SUFFIXES = (".jsonl", ".parquet", ".tsv")


def is_pairs(spec: str | None) -> bool:
    """Whether ``spec`` names (source, target) pairs: nombres, a .tsv, or a .jsonl or .parquet file that is not a
    corpus of documents."""
    return spec is not None and (spec in GENERATED or Path(spec).suffix in SUFFIXES
                                 and not holds_documents(Path(spec).expanduser()))


def read_pairs(path: str) -> list[tuple[str, str]]:
    """JSONL or Parquet records with ``source`` and ``target``, or TSV lines ``source<TAB>target``; a bad line is
    named."""
    if not path.endswith(".tsv"):
        records = read_rows(Path(path))
        if bad := next(((where, r) for where, r in records if not isinstance(r, dict)
                        or not all(isinstance(r.get(k), str) for k in ("source", "target"))), None):
            raise FournilError(f"{bad[0]}: each record needs text fields 'source' and 'target'"
                               f"{other_kind(bad[1], '(source, target) pairs') or unknown(bad[1])}")
        rows = [(where, (r["source"], r["target"])) for where, r in records]
    else:
        rows = []
        for n, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise FournilError(f"{path}, line {n}: a TSV line is a source, one tab, then a target "
                                   f"({len(fields)} fields here)")
            rows.append((f"{path}, line {n}", (fields[0], fields[1])))
    if empty := next((where for where, (source, target) in rows if not source.strip() or not target.strip()), None):
        raise FournilError(f"{empty}: the source and the target must not be empty")
    return [pair for _, pair in rows]


def unknown(record) -> str:
    """For a record of neither pairs nor any other kind fournil reads (its fields misnamed, say): its fields, and the
    one a corpus of documents has, since a .jsonl given to ``fournil train`` may have been meant as one."""
    if not isinstance(record, dict) or "source" in record or "target" in record:
        return ""
    fields = ", ".join(map(repr, record)) or "none"
    return f" (this one has {fields}); a corpus of documents has a 'text' field instead"


def pair_splits(cfg) -> tuple[dict, dict]:
    """The train/val/test pairs of ``cfg`` (a :class:`DataConfig`) and fingerprints of what was read."""
    explicit = [cfg.train, cfg.val, cfg.test]
    if any(explicit):
        parts = {name: read_pairs(path) for name, path in zip(("train", "val", "test"), explicit)}
        return parts, {name: fingerprint(json.dumps(p)) for name, p in parts.items()}
    pairs = GENERATED[cfg.data](seed=cfg.seed) if cfg.data in GENERATED else read_pairs(cfg.data)
    if cfg.data not in GENERATED:
        random.Random(cfg.seed).shuffle(pairs)
    n_train, n_val = int(cfg.split[0] * len(pairs)), int(cfg.split[1] * len(pairs))
    if min(n_train, n_val, len(pairs) - n_train - n_val) == 0:
        raise too_few_to_split(cfg.data, len(pairs), "pair", cfg.split)
    parts = {"train": pairs[:n_train], "val": pairs[n_train : n_train + n_val], "test": pairs[n_train + n_val :]}
    if cfg.data in PRACTISED:
        parts["train"] = PRACTISED[cfg.data](parts["train"])
    return parts, {"data": fingerprint(json.dumps(pairs))}


class PairData:
    """Sources as they are; targets framed by BOS and EOS (``[b, t1, ..., tn, b]`` with characters), read by the
    decoder one token behind what it predicts. Padded to the longest of each batch."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, split: str):
        start, end = frame_ids(tokenizer)
        self.split, self.pairs, self.pad = split, pairs, end
        self.sources = [torch.tensor(tokenizer.encode(s, strict=False)) for s, _ in pairs]
        self.targets = [torch.tensor([start, *tokenizer.encode(t, strict=False), end]) for _, t in pairs]
        self.num_targets = sum(len(t) - 1 for t in self.targets)

    @property
    def longest(self) -> int:
        return max(max(len(s) for s in self.sources), max(len(t) - 1 for t in self.targets))

    def check_fits(self, block_size: int, flag: str) -> None:
        if self.longest > block_size:
            raise FournilError(f"the {self.split} split has a source or target of {self.longest} tokens, longer than "
                               f"the model's {block_size}; raise {flag} to at least {self.longest}")

    def _collate(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.full((len(rows), max(len(self.sources[i]) for i in rows)), self.pad, dtype=torch.long)
        width = max(len(self.targets[i]) for i in rows) - 1
        x = torch.full((len(rows), width), self.pad, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(rows):
            s, t = self.sources[i], self.targets[i]
            src[row, : len(s)] = s
            x[row, : len(t) - 1], y[row, : len(t) - 1] = t[:-1], t[1:]
        return src, x, y

    def sample(self, batch_size: int, generator: torch.Generator):
        return self._collate(torch.randint(len(self.pairs), (batch_size,), generator=generator).tolist())

    def scored(self, max_tokens: int | None = None) -> list[int]:
        """The pairs that scoring up to about ``max_tokens`` targets reads (every one for None), by target length."""
        return thinned(sorted(range(len(self.pairs)), key=lambda i: len(self.targets[i])), self.num_targets, max_tokens)

    def batches(self, batch_size: int, max_tokens: int | None = None):
        """Every pair once (grouped by target length), up to about ``max_tokens`` targets."""
        order = self.scored(max_tokens)
        for start in range(0, len(order), batch_size):
            yield self._collate(order[start : start + batch_size])
