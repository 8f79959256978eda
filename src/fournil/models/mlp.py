"""The multilayer perceptron language model of Bengio et al. (2003).

Each of the last ``context`` characters is embedded in a small vector; the vectors are concatenated and go
through tanh hidden layer(s) to a softmax over the next character.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fournil.models.base import Dropout, LanguageModel, at_least, target_logprobs, windows


@dataclass
class MLPConfig:
    vocab_size: int = 0
    block_size: int = 0
    boundary_id: int | None = None  # pads the window at the start of a document; None: a start symbol of its own
    context: int = 3  # how many previous characters the model sees
    n_embd: int = 16  # size of each character's embedding
    n_hidden: int = 256  # width of each hidden layer
    n_layer: int = 1  # number of hidden layers
    dropout: float = 0.0


class MLP(LanguageModel):
    family = "mlp"

    def __init__(self, config: MLPConfig):
        super().__init__()
        at_least(config, 1, "context", "n_embd", "n_hidden")
        at_least(config, 0, "n_layer")  # 0: the embeddings straight to the output layer, a linear model
        self.config = config
        self.pad = config.boundary_id if config.boundary_id is not None else config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + 1: the start symbol
        layers, width = [], config.context * config.n_embd
        for _ in range(config.n_layer):
            layers += [nn.Linear(width, config.n_hidden), nn.Tanh(), Dropout(config.dropout)]
            width = config.n_hidden
        self.hidden = nn.Sequential(*layers)
        self.lm_head = nn.Linear(width, config.vocab_size)
        with torch.no_grad():  # a small last layer gives a near-uniform first guess (loss ~ log V, not higher)
            self.lm_head.weight.mul_(0.1)
            self.lm_head.bias.zero_()

    @property
    def reads(self) -> int:
        return self.config.context

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or with ``targets`` the log-probability of each."""
        ctx = windows(idx, self.config.context, self.pad)  # (B, T, context)
        x = self.hidden(self.wte(ctx).flatten(2))  # (B, T, context * n_embd) -> (B, T, n_hidden)
        return self.lm_head(x) if targets is None else target_logprobs(self.lm_head, x, targets)
