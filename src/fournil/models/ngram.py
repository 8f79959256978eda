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
        # Only contexts seen in training get a row: sorted context keys and their next-token counts.
        self.register_buffer("contexts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0, config.vocab_size, dtype=torch.float64))

    def num_params(self) -> int:
        return self.counts.numel()

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
        counts = torch.zeros(len(contexts), self.config.vocab_size, dtype=torch.float64)
        counts.index_put_((row, torch.cat(targets)), torch.ones(len(row), dtype=torch.float64), accumulate=True)
        self.contexts, self.counts = contexts, counts

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities (B, T, vocab), valid logits; or with ``targets`` the log-probability of each."""
        if not len(self.contexts):
            raise FournilError("this n-gram model has no counts yet: train it first")
        keys = self._keys(idx)
        row = torch.searchsorted(self.contexts, keys).clamp(max=len(self.contexts) - 1)
        seen = self.contexts[row] == keys  # an unseen context has all-zero counts
        counts = self.counts[row] * seen[..., None] + self.config.smoothing
        total = counts.sum(-1, keepdim=True)
        probs = torch.where(total > 0, counts / total, 1.0 / self.config.vocab_size)
        logprobs = probs.log()
        return logprobs if targets is None else target_logprobs(nn.Identity(), logprobs, targets)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The table's size is known only once counted, so take the saved tensors as they are.
        self.contexts, self.counts = state_dict["contexts"], state_dict["counts"].to(torch.float64)
        return torch.nn.modules.module._IncompatibleKeys([], [])
