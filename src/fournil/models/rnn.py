"""A recurrent language model: a GRU (or an LSTM) reads the characters one by one and carries a state."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fournil.errors import FournilError
from fournil.models.base import LanguageModel, at_least, target_logprobs

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class RNNConfig:
    vocab_size: int = 0
    block_size: int = 0
    cell: str = "gru"  # gru or lstm
    n_embd: int = 64
    n_hidden: int = 256
    n_layer: int = 2
    dropout: float = 0.0


class RNN(LanguageModel):
    family = "rnn"

    def __init__(self, config: RNNConfig):
        super().__init__()
        at_least(config, 1, "n_embd", "n_hidden", "n_layer")
        if config.cell not in CELLS:
            raise FournilError(f"unknown cell {config.cell!r}: use gru or lstm")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rnn = CELLS[config.cell](
            config.n_embd, config.n_hidden, num_layers=config.n_layer, batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or with ``targets`` the log-probability of each."""
        out, _ = self.rnn(self.wte(idx))
        return self.lm_head(out) if targets is None else target_logprobs(self.lm_head, out, targets)
