"""What every model shares: ``forward(idx) -> logits`` of shape (B, T, vocab), a config, a parameter count."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LanguageModel(nn.Module):
    """Base class: subclasses set ``family`` and implement ``forward``."""

    family = ""
    counts_only = False  # True for models that learn by counting in one pass (``fit``), not by gradient descent

    def num_params(self) -> int:
        """Parameters a learner would count: each weight once, tied weights once, counts of an n-gram table."""
        seen = {p.data_ptr(): p.numel() for p in self.parameters()}
        return sum(seen.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.state_dict().values())).device


def windows(idx: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """For each position t, the ``width`` tokens ending at t, left-padded with ``pad``: shape (B, T, width).

    This is the context a fixed-window model (n-gram, MLP) conditions on to predict token t + 1.
    """
    padded = F.pad(idx, (width - 1, 0), value=pad)
    return padded.unfold(1, width, 1)
