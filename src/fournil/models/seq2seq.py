"""The full Transformer (Vaswani et al. 2017): an encoder reads the whole source with bidirectional self-attention;
a decoder writes the target with causal self-attention, and reads the encoder's states through cross-attention.

Pre-norm blocks like ``gpt`` (more stable to train than the paper's post-norm), learned positions, GELU MLPs.
Weight names follow Hugging Face's BART (``model.encoder.layers.0.self_attn.q_proj.weight``,
``model.decoder.layers.0.encoder_attn.k_proj.weight``...). ``forward(source, target)`` gives the logits of each next
target token, so the same next-token loss trains it; ``encode`` then ``decode`` step by step generate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError
from fournil.models.base import Dropout, LanguageModel, at_least, attend, target_logprobs


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 0
    block_size: int = 0  # the longest source or target, in tokens
    n_layer: int = 3  # encoder layers, and as many decoder layers
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bos_id: int = 0  # starts each target
    eos_id: int = 0  # ends each target, and pads sources (which never hold it)
    shared_embeddings: bool = True  # one token embedding table for the encoder and the decoder
    tie_embeddings: bool = True  # the output layer reuses the decoder's token embeddings


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``memory`` (cross-attention) or over itself (self-attention)."""

    recorded = None  # a list while attention weights are recorded (fournil.evaluate.attention)

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(config.n_embd, config.n_embd) for _ in range(4))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False, past: list | None = None) -> torch.Tensor:
        """``past`` (self-attention while generating): the keys and values of earlier steps, extended in place."""
        source = x if memory is None else memory
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(source)), self.heads(self.v_proj(source))
        if past is not None:
            if past:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            past[:] = [k, v]
        y = attend(self, q, k, v, mask, causal=causal, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class Layer(nn.Module):
    """Self-attention then a GELU MLP (``fc1``, ``fc2``), each behind a LayerNorm and added to the residual stream."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(config.n_embd), Attention(config)
        self.final_layer_norm = nn.LayerNorm(config.n_embd)
        self.fc1 = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc2 = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))


class EncoderLayer(Layer):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask=mask)  # every source token reads every other
        return self.mlp(x)


class DecoderLayer(Layer):
    """Between the two, cross-attention: each target position reads the encoder's states of the source."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__(config)
        self.encoder_attn_layer_norm, self.encoder_attn = nn.LayerNorm(config.n_embd), Attention(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, past: list | None) -> torch.Tensor:
        causal = past is None or (not past and x.shape[1] > 1)  # one new token after cached ones reads them all
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal=causal, past=past)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), memory, mask)
        return self.mlp(x)


class Stack(nn.Module):
    """Token and position embeddings, layers, a final norm: the encoder or the decoder."""

    def __init__(self, config: Seq2SeqConfig, layer, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList([layer(config) for _ in range(config.n_layer)])
        self.layer_norm = nn.LayerNorm(config.n_embd)

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.dropout(self.embed_tokens(idx) + self.embed_positions(pos))


class Seq2Seq(LanguageModel):
    family = "seq2seq"

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        at_least(config, 1, "n_layer", "n_head", "n_embd")
        if config.n_embd % config.n_head:
            raise FournilError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.config = config
        shared = nn.Embedding(config.vocab_size, config.n_embd)
        own = shared if config.shared_embeddings else nn.Embedding(config.vocab_size, config.n_embd)
        self.model = nn.ModuleDict(dict(shared=shared, encoder=Stack(config, EncoderLayer, own),
                                        decoder=Stack(config, DecoderLayer, shared)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = shared.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():  # as GPT-2: residual projections scaled by depth
            if name.endswith(("out_proj.weight", "fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(3 * config.n_layer))

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's states of each source token, and the mask of real (not padding) tokens, (B, 1, 1, S)."""
        self.check_length(source)
        mask = (source != self.config.eos_id)[:, None, None, :]
        encoder = self.model.encoder
        x = encoder.embed(source)
        for layer in encoder.layers:
            x = layer(x, mask)
        return encoder.layer_norm(x), mask

    def decode(self, target: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
               cache: list[list] | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the token after each of ``target`` (with ``targets``, the log-probability of each); with a
        ``cache`` (one list per layer, empty at first), ``target`` continues the tokens it holds."""
        decoder = self.model.decoder
        start = cache[0][0].shape[2] if cache and cache[0] else 0
        self.check_length(target, start)
        x = decoder.embed(target, start)
        for i, layer in enumerate(decoder.layers):
            x = layer(x, memory, mask, None if cache is None else cache[i])
        x = decoder.layer_norm(x)
        return self.lm_head(x) if targets is None else target_logprobs(self.lm_head, x, targets)

    def forward(self, source: torch.Tensor, target: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(target, *self.encode(source), targets=targets)

    def new_cache(self) -> list[list]:
        return [[] for _ in range(self.config.n_layer)]

    def check_length(self, idx: torch.Tensor, start: int = 0) -> None:
        if start + idx.shape[1] > self.config.block_size:
            raise FournilError(f"{start + idx.shape[1]} tokens do not fit the model's context of "
                               f"{self.config.block_size}")
