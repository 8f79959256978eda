"""A reward model: a language model's body with a scalar head, trained on preference pairs to score answers.

The head (``score``, as transformers names it in its sequence-classification models) reads the last layer's state
at the end of the answer: the position whose next token is the answer's last, so the state has read the whole answer.
"""
from __future__ import annotations

import torch
from torch import nn

from fournil.data.batches import IGNORE

HEAD = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(lm.config.n_embd, 1, bias=False, device=lm.device)
        nn.init.zeros_(self.score.weight)  # every answer starts equal

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One reward per row of ``x``; ``y`` holds the row's answer targets (``IGNORE`` elsewhere), as in
        instruction data."""
        positions = torch.arange(y.shape[1], device=y.device).expand_as(y)
        end = torch.where(y != IGNORE, positions, -1).max(-1).values
        h = self.lm.hidden(x)
        return self.score(h[torch.arange(len(x), device=x.device), end]).squeeze(-1)

    def num_params(self) -> int:
        return self.lm.num_params() + self.score.weight.numel()

    def flops_per_token(self, context: int) -> float:
        return self.lm.flops_per_token(context)

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def config(self):
        return self.lm.config
