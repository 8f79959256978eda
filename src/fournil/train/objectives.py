"""Objectives: what a training step minimises. ``loss(model, batch) -> (loss, metrics)``."""
from __future__ import annotations

import torch.nn.functional as F

from fournil.data.batches import IGNORE


class NextTokenPrediction:
    """Pretraining: the average negative log-likelihood of each next token (padding excluded)."""

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        return loss, {"tokens": int((y != IGNORE).sum())}
