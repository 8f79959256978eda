"""Token ids in batches: random batches for training, every token once for evaluation.

Targets are the inputs shifted by one; padded positions carry the target ``IGNORE`` and add no loss.
"""
from __future__ import annotations

import torch

from fournil.errors import FournilError

IGNORE = -1
SHARED, PADDING, PREFIX = -1, -2, -3  # :func:`pack`: the batch's shared prompt, padding, a group's prompt


def frame_ids(tokenizer) -> tuple[int, int]:
    """The tokens a document starts and ends with: BOS and EOS (both the boundary in a character vocabulary)."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise FournilError("lines data needs a tokenizer with BOS and EOS tokens to mark where each document starts "
                           "and ends; this one lacks them: use --mode text, or another tokenizer")
    return tokenizer.bos_id, tokenizer.eos_id


def thinned(order: list[int], total: int, max_tokens: int | None) -> list[int]:
    """Examples in ``order`` (holding ``total`` targets), evenly subsampled to about ``max_tokens`` targets."""
    if max_tokens is None or max_tokens >= total:
        return order
    return order[:: max(1, round(total / max_tokens))]


def pack(x: torch.Tensor, y: torch.Tensor, width: int, share: bool = False,
         sizes: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Rows (N, T) of one padded document each, laid end to end into as few rows of about ``width`` tokens as
    first-fit packing finds, longest first (a row is as wide as the longest document, if that is wider): ``(x, sees,
    y, owner)``. ``sees`` (rows, columns, columns) says which earlier tokens of its row each token sees: those of its
    own document; ``owner`` is the row of ``y`` each position's target comes from (``SHARED``, ``PREFIX`` or
    ``PADDING`` where none). The rows are cut after the last column any of them fills.

    A Transformer given ``sees`` attends within each document and counts positions from its start, so every
    target gets exactly the log-probability it has in the padded rows: the same loss and gradients, from fewer
    positions (most names are much shorter than the longest in their batch: 0.69 times the positions and half the
    rows for names in batches of 64, 0.55 times for prénoms).

    With ``share``, what every row holds before the batch's first target is read once at the start of each packed
    row, and every document there sees it: a chat template's system prompt, 24 of the 57 tokens of
    rasbt_instructions' examples with SmolLM2's. With ``sizes``, that many rows in turn that start alike (a DPO pair's
    chosen and rejected answers, GRPO's answers to one prompt) are one document: what they share up to their first
    target (the prompt) once, then each row's rest, from the token that predicts its first target, unseen by the
    others. (Both move a row's tokens away from what it sees: not for a model with a sliding window.)"""
    B, T = y.shape
    columns = torch.arange(T, device=y.device)
    learned = y != IGNORE
    ends = torch.where(learned, columns + 1, 0).amax(-1).tolist()  # one past each row's last target
    first = torch.where(learned, columns, T).amin(-1).tolist()
    trunk = 0
    if share:
        trunk = min(min(first), int(torch.where((x != x[:1]).any(0), columns, T).amin()))
    groups, lo = [], 0  # (first row, end row, where their rests start)
    for n in sizes or [1] * B:
        differ = T if n == 1 else int(torch.where((x[lo + 1 : lo + n] != x[lo]).any(0), columns, T).amin())
        shared = min(*first[lo : lo + n], differ, max(ends[lo : lo + n]))  # (no target: nothing)
        groups.append((lo, lo + n, max(trunk, shared)))
        lo += n
    lengths = [s - trunk + sum(max(ends[r] - s, 0) for r in range(a, b)) for a, b, s in groups]
    width = max(width, trunk + max(lengths))
    room, place = [], [None] * len(groups)  # place: (row, first column) of each group
    for g in sorted(range(len(groups)), key=lambda g: -lengths[g]):
        r = next((r for r, free in enumerate(room) if free >= lengths[g]), len(room))
        if r == len(room):
            room.append(width - trunk)
        place[g] = (r, width - room[r])
        room[r] -= lengths[g]
    brings = []  # each input row's part: (packed row, first column there, columns from, to, prompt before, group)
    for g, (a, b, s) in enumerate(groups):
        at = place[g][1]
        for r in range(a, b):
            lo = trunk if r == a else s  # the group's first row brings the prompt they share
            brings.append((place[g][0], at, lo, max(ends[r], s), s, g))
            at += max(ends[r], s) - lo
    row, start, low, high, cut, doc = (torch.tensor(v, device=y.device)[:, None] for v in zip(*brings))
    real = (columns >= low) & (columns < high)  # (N, T): the positions each row brings
    to = (row * width + start + columns - low)[real]  # where each goes in the packed rows, read as one
    size = len(room) * width
    px, py = x.new_zeros(size), y.new_full((size,), IGNORE)
    owner = torch.full((size,), PADDING, device=y.device)
    documents = torch.full((size,), -1, device=y.device)
    rows = torch.arange(B, device=y.device)[:, None]
    px[to], py[to], documents[to] = x[real], y[real], doc.expand(B, T)[real]
    owner[to] = torch.where(columns < cut, PREFIX, rows).expand(B, T)[real]
    filled = width - min(room)  # (columns no row reaches are cut off)
    px, py, owner, documents = (t.view(-1, width)[:, :filled].contiguous() for t in (px, py, owner, documents))
    px[:, :trunk], owner[:, :trunk] = x[0, :trunk], SHARED
    same = documents[:, :, None] == documents[:, None, :]
    own = (owner[:, :, None] == owner[:, None, :]) | (owner[:, None, :] == PREFIX)
    sees = ((same & own) | (owner[:, None, :] == SHARED)).tril()
    eye = torch.eye(filled, dtype=torch.bool, device=y.device)
    sees = torch.where((owner == PADDING)[:, :, None], eye, sees)  # padding sees itself only: its position stays 0
    return px, sees, py, owner


def row_sums(values: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    """The sum of ``values`` over each row's own positions in :func:`pack`'s layout: one per row (rows). (Not
    ``index_add``, whose sums on a GPU come in any order, and so differ from run to run in the last bits.)"""
    mine = owner[..., None] == torch.arange(rows, device=owner.device)
    return torch.where(mine, values[..., None], 0).sum((0, 1))


def prompt_groups(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """The sizes of the runs of consecutive rows whose prompts (their tokens before the first target) are the same:
    what :func:`pack` reads once (GRPO's batches hold each prompt's answers in turn)."""
    T = y.shape[1]
    columns = torch.arange(T, device=y.device)
    first = torch.where(y != IGNORE, columns, T).amin(-1)
    same = ((x[1:] == x[:-1]) | (columns >= first[:-1, None])).all(-1) & (first[1:] == first[:-1])
    cuts = [0, *(i + 1 for i in torch.nonzero(~same).flatten().tolist()), len(y)]
    return [b - a for a, b in zip(cuts, cuts[1:])]


class LineData:
    """Documents framed by the boundary token, ``[b, c1, ..., cn, b]``, padded to the longest in each batch."""

    def __init__(self, docs: list[str], tokenizer, split: str):
        start, end = frame_ids(tokenizer)
        self.split = split
        self.seqs = [torch.tensor([start, *tokenizer.encode(d, strict=False), end]) for d in docs]
        self.pad = end
        self.num_targets = sum(len(s) - 1 for s in self.seqs)

    @property
    def longest(self) -> int:
        """The longest input, in tokens: the context length a model needs for this split."""
        return max(len(s) for s in self.seqs) - 1

    def check_fits(self, block_size: int, flag: str) -> None:
        if self.longest > block_size:
            raise FournilError(f"the {self.split} split has a document of {self.longest - 1} tokens, longer than the "
                               f"model's context of {block_size} (a document reads its start too); raise {flag} to at "
                               f"least {self.longest}")

    def _collate(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        y = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for row, s in enumerate(seqs):
            x[row, : len(s) - 1] = s[:-1]
            y[row, : len(s) - 1] = s[1:]
        return x, y

    def sample(self, batch_size: int, generator: torch.Generator):
        picks = torch.randint(len(self.seqs), (batch_size,), generator=generator)
        return self._collate([self.seqs[i] for i in picks.tolist()])

    def batches(self, batch_size: int, max_tokens: int | None = None):
        """Every document once (grouped by length so little is padded), up to about ``max_tokens`` targets."""
        order = thinned(sorted(range(len(self.seqs)), key=lambda i: len(self.seqs[i])), self.num_targets, max_tokens)
        for start in range(0, len(order), batch_size):
            yield self._collate([self.seqs[i] for i in order[start : start + batch_size]])


class TextData:
    """Running text as one stream of ids, read in windows of ``block_size`` tokens."""

    def __init__(self, text: str, tokenizer, split: str, block_size: int):
        self.split = split
        bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []  # a model that expects BOS first gets it
        self.stream = torch.tensor(bos + tokenizer.encode(text, strict=False), dtype=torch.long)
        self.block_size = block_size
        self.num_targets = len(self.stream) - 1
        if len(self.stream) < 2:
            raise FournilError(f"the {split} split is too short to score ({len(self.stream)} tokens); add text")

    def check_fits(self, block_size: int, flag: str) -> None:
        if self.split == "train" and len(self.stream) <= block_size:
            raise FournilError(f"the train split has {len(self.stream):,} tokens, not more than the context length "
                               f"{block_size}: use a smaller {flag} or more text")

    def sample(self, batch_size: int, generator: torch.Generator):
        t = self.block_size
        starts = torch.randint(len(self.stream) - t, (batch_size,), generator=generator)
        x = torch.stack([self.stream[s : s + t] for s in starts.tolist()])
        y = torch.stack([self.stream[s + 1 : s + 1 + t] for s in starts.tolist()])
        return x, y

    def batches(self, batch_size: int, max_tokens: int | None = None):
        """Consecutive non-overlapping windows covering the split (the last one may be shorter)."""
        t, n = self.block_size, self.num_targets
        if max_tokens is not None:
            n = min(n, max_tokens)
        starts = list(range(0, n, t))
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            width = min(t, n - group[0])
            x = torch.full((len(group), width), 0, dtype=torch.long)
            y = torch.full((len(group), width), IGNORE, dtype=torch.long)
            for row, s in enumerate(group):
                w = min(t, n - s)
                x[row, :w] = self.stream[s : s + w]
                y[row, :w] = self.stream[s + 1 : s + 1 + w]
            yield x, y


class ShardData(TextData):
    """Token ids already on disk (``fournil prepare``): the same windows as running text, read from memory maps."""

    def __init__(self, shards, split: str, block_size: int):
        self.split, self.shards, self.block_size = split, shards, block_size
        self.stream = shards  # only its length is read in check_fits
        self.num_targets = len(shards) - 1

    def sample(self, batch_size: int, generator: torch.Generator):
        t = self.block_size
        starts = torch.randint(len(self.shards) - t, (batch_size,), generator=generator).tolist()
        rows = torch.stack([self.shards.window(s, t + 1) for s in starts])
        return rows[:, :-1], rows[:, 1:]

    def batches(self, batch_size: int, max_tokens: int | None = None):
        t, n = self.block_size, min(self.num_targets, max_tokens or self.num_targets)
        starts = list(range(0, n, t))
        for i in range(0, len(starts), batch_size):
            rows = [self.shards.window(s, min(t, n - s) + 1) for s in starts[i : i + batch_size]]
            width = max(len(r) for r in rows) - 1
            x = torch.zeros((len(rows), width), dtype=torch.long)
            y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for row, r in enumerate(rows):
                x[row, : len(r) - 1], y[row, : len(r) - 1] = r[:-1], r[1:]
            yield x, y


def make_data(splits, tokenizer, block_size: int, names=("train", "val", "test"), flag: str = "--block-size") -> dict:
    """Token data for each split ``names`` holds, checked against the model's context length (``flag``: the one that
    sets it, which an error names)."""
    from fournil.data.pairs import PairData
    from fournil.data.shards import Shards

    data = {}
    for name, part in splits.items():
        if name not in names:
            continue
        if isinstance(part, Shards):
            d = ShardData(part, name, block_size)
        elif splits.mode == "pairs":
            d = PairData(part, tokenizer, name)
        elif splits.mode == "lines":
            d = LineData(part, tokenizer, name)
        else:
            d = TextData(part, tokenizer, name, block_size)
        d.check_fits(block_size, flag)
        data[name] = d
    return data
