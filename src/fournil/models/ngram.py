"""A count-based n-gram model: P(next | previous n-1 tokens) from counts, with add-k smoothing.

n = 2 is the bigram of the makemore lecture. Its negative log-likelihood is exact: nothing is learned by
gradient descent, the table of counts *is* the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fournil.data.batches import IGNORE
from fournil.errors import FournilError
from fournil.models.base import LanguageModel, target_logprobs, windows


@dataclass
class NGramConfig:
    vocab_size: int = 0
    block_size: int = 0  # the context used when sampling; the model only looks at n - 1 tokens
    boundary_id: int | None = None  # pads contexts at the start of a document; None means a start symbol of its own
    n: int = 2  # the order: 2 = bigram, 3 = trigram, ...
    smoothing: float = 1.0  # add-k: every count gets k, so unseen pairs keep some probability


class NGram(LanguageModel):
    family = "ngram"
    counts_only = True
    exact = ("counts",)  # counts, not weights: bf16 holds the integers up to 256 only (1,001 would become 1,000)

    def __init__(self, config: NGramConfig):
        super().__init__()
        if config.n < 1:
            raise FournilError(f"n-gram order must be at least 1 (got n={config.n})")
        if config.smoothing < 0:
            raise FournilError(f"smoothing must be zero or more (got {config.smoothing})")
        self.config = config
        self.base = config.vocab_size + 1  # context symbols: the vocabulary and a start symbol
        if self.base ** (config.n - 1) >= 2**62:
            raise FournilError(f"n={config.n} is too large for a vocabulary of {config.vocab_size}: lower --n")
        self.pad = config.boundary_id if config.boundary_id is not None else config.vocab_size
        # Only contexts seen in training get a row, and a row keeps only the next tokens seen after it (the table's
        # other cells are 0): sorted context keys; where each row starts among the cells (one more: the end); the
        # cells' tokens and counts. A trigram of Shakespeare's 4,096 BPE tokens: 5 MB, not 3 GB of mostly zeros.
        self.register_buffer("contexts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("starts", torch.zeros(1, dtype=torch.long))
        self.register_buffer("tokens", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    @property
    def reads(self) -> int:
        return self.config.n - 1

    def num_params(self) -> int:
        """The table's size: a count for each next token after each context seen (most of them 0)."""
        return len(self.contexts) * self.config.vocab_size

    def _keys(self, idx: torch.Tensor) -> torch.Tensor:
        """Each position's context (its last n - 1 tokens) as one integer."""
        width = self.config.n - 1
        if width == 0:
            return torch.zeros_like(idx)
        weights = self.base ** torch.arange(width - 1, -1, -1, device=idx.device)
        return (windows(idx, width, self.pad) * weights).sum(-1)

    @torch.no_grad()
    def fit(self, batches) -> None:
        """Count every (context, next token) pair in ``batches`` of (inputs, targets)."""
        keys, targets = [], []
        for x, y in batches:
            mask = y != IGNORE
            keys.append(self._keys(x)[mask])
            targets.append(y[mask])
        contexts, row = torch.unique(torch.cat(keys), return_inverse=True)
        cells, counts = torch.unique(row * self.config.vocab_size + torch.cat(targets), return_counts=True)
        self.load_state_dict(table(contexts, cells // self.config.vocab_size, cells % self.config.vocab_size,
                                   counts.double()))

    def upgrade(self, tensors: dict) -> dict:
        """A run counted before the table kept only its cells had a dense row per context: its cells."""
        if "counts" not in tensors or tensors["counts"].dim() != 2:
            return tensors
        rows, tokens = tensors["counts"].nonzero(as_tuple=True)
        return table(tensors["contexts"], rows, tokens, tensors["counts"][rows, tokens])

    def _rows(self, row: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The counts of the rows ``row`` (any shape) as dense (..., vocab) rows; zeros where not ``seen``."""
        row, seen = row.reshape(-1), seen.reshape(-1)
        lo = self.starts[row]
        n = (self.starts[row + 1] - lo) * seen  # the cells of each position's row
        first = torch.cumsum(n, 0) - n
        cell = torch.repeat_interleave(lo - first, n) + torch.arange(int(n.sum()), device=row.device)
        dense = torch.zeros(len(row), self.config.vocab_size, dtype=torch.float64, device=row.device)
        dense[torch.repeat_interleave(torch.arange(len(row), device=row.device), n), self.tokens[cell]] = \
            self.counts[cell]
        return dense

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities (B, T, vocab), valid logits; or with ``targets`` the log-probability of each."""
        if not len(self.contexts):
            raise FournilError("this n-gram model has no counts yet: train it first")
        keys = self._keys(idx)
        row = torch.searchsorted(self.contexts, keys).clamp(max=len(self.contexts) - 1)
        seen = self.contexts[row] == keys  # an unseen context has all-zero counts
        counts = self._rows(row, seen).view(*keys.shape, -1) + self.config.smoothing
        total = counts.sum(-1, keepdim=True)
        probs = torch.where(total > 0, counts / total, 1.0 / self.config.vocab_size)
        logprobs = probs.log()
        return logprobs if targets is None else target_logprobs(nn.Identity(), logprobs, targets)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The table's size is known only once counted, so take the saved tensors as they are.
        self.contexts, self.starts, self.tokens = (state_dict[k] for k in ("contexts", "starts", "tokens"))
        self.counts = state_dict["counts"].to(torch.float64)
        return torch.nn.modules.module._IncompatibleKeys([], [])


def table(contexts: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> dict:
    """The n-gram table's tensors from its cells (sorted by row): each row's start is found among them."""
    starts = torch.searchsorted(rows, torch.arange(len(contexts) + 1, device=rows.device))
    return {"contexts": contexts, "starts": starts, "tokens": tokens, "counts": counts}
