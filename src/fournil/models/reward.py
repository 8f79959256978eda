"""A reward model: a language model's body with a scalar head, trained on preference pairs to score answers.

The head (``score``, as transformers names it in its sequence-classification models) reads the last layer's state
at the end of the answer: the position whose next token is the answer's last, so the state has read the whole answer.
"""
from __future__ import annotations

import torch
from torch import nn

from fournil.data.batches import IGNORE, pack
from fournil.errors import FournilError
from fournil.models.base import packed_width, shares_prompts

HEAD = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        if lm.family not in ("gpt", "llama"):  # (an mlp's "hidden" is a layer, not its states: a traceback)
            raise FournilError(f"a reward model is a Transformer's body (gpt, llama) with a score head; this model is "
                               f"{lm.family}")
        self.lm = lm
        self.score = nn.Linear(lm.config.n_embd, 1, bias=False, device=lm.device)
        nn.init.zeros_(self.score.weight)  # every answer starts equal

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One reward per row of ``x``; ``y`` holds the row's answer targets (``IGNORE`` elsewhere), as in
        instruction data. Given pairs (pairs, 2, T), one reward per answer (pairs, 2), each pair's prompt read once
        where the model can (:func:`pack`)."""
        if x.dim() == 2:
            return self.score(self.lm.hidden(x)[torch.arange(len(x), device=x.device), last_target(y)]).squeeze(-1)
        rows, ys = x.flatten(0, 1), y.flatten(0, 1)
        if not shares_prompts(self.lm):
            return self(rows, ys).view(-1, 2)
        xs, sees, ys, owner = pack(rows, ys, packed_width(self.lm), share=True, sizes=[2] * len(x))
        h = self.lm.hidden(xs, sees=sees).flatten(0, 1)
        answered = (owner[..., None] == torch.arange(len(rows), device=x.device)) & (ys != IGNORE)[..., None]
        at = torch.arange(owner.numel(), device=x.device).view_as(owner)[..., None]
        ends = torch.where(answered, at, -1).amax((0, 1))  # where each answer's last target is, in the packed rows
        return self.score(h[ends]).squeeze(-1).view(-1, 2)

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


def last_target(y: torch.Tensor) -> torch.Tensor:
    """The position of each row's last target: its state has read the whole answer."""
    positions = torch.arange(y.shape[1], device=y.device).expand_as(y)
    return torch.where(y != IGNORE, positions, -1).max(-1).values
