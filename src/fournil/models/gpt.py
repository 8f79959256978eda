"""A decoder-only Transformer in the GPT-2 mould: pre-norm blocks of causal self-attention and a GELU MLP.

Weight names follow Hugging Face's GPT-2 (``transformer.h.0.attn.c_attn.weight``...), stored as ``nn.Linear``
(out, in) the way nanoGPT does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError
from fournil.generate.cache import KVCache, positions_and_mask
from fournil.models.base import Dropout, LanguageModel, at_least, attend, target_logprobs


@dataclass
class GPTConfig:
    vocab_size: int = 0
    block_size: int = 0  # the longest context, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and LayerNorms, as in GPT-2
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    activation: str = "gelu"  # exact GELU; "gelu_new" is GPT-2's tanh approximation (Hugging Face's names)


class CausalSelfAttention(nn.Module):
    recorded = None  # a list while attention weights are recorded (fournil.evaluate.attention)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.store(layer, k, v)
        y = attend(self, q, k, v, mask, causal=mask is None and T > 1, dropout=self.dropout if self.training else 0.0,
                   kernel=cache.kernel if cache is not None else 0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.approximate = ACTIVATIONS[config.activation]
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    family = "gpt"
    checkpointing = False
    packs = True

    def __init__(self, config: GPTConfig):
        super().__init__()
        at_least(config, 1, "n_head", "n_embd")
        at_least(config, 0, "n_layer")  # 0: each token's embedding straight to the output layer, a bigram model
        if config.n_embd % config.n_head:
            raise FournilError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if config.activation not in ACTIVATIONS:
            raise FournilError(f"activation {config.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch: int, size: int, dtype: torch.dtype) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, size, c.n_embd // c.n_head, self.device, dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None,
                logits_to_keep: int | None = None, targets: torch.Tensor | None = None,
                sees: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``idx`` (for its last ``logits_to_keep`` positions only, if given); with a ``cache``, ``idx``
        continues what the cache holds (``valid`` marks padding). With ``targets``, the log-probability of each
        instead, without ever holding every position's logits (:func:`target_logprobs`). ``sees``: ``idx`` holds rows
        of several sequences each, and which earlier tokens each token attends to (:func:`positions_and_mask`)."""
        x = self.hidden(idx, cache, valid, sees)
        if targets is not None:
            return target_logprobs(self.lm_head, x, targets)
        return self.lm_head(x if logits_to_keep is None else x[:, x.shape[1] - logits_to_keep :])

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None,
               sees: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's normalized states (B, T, n_embd): what the output layer reads, and a reward head too."""
        pos, mask = positions_and_mask(idx, cache, valid, self.config.block_size, sees)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = self.run_layer(block, x, cache, i, mask)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.transformer.ln_f(x)
