"""The key/value cache: what attention has already computed for earlier tokens, kept so each new token costs one step.

Preallocated for the whole generation (``batch`` rows of ``size`` slots per layer). Rows of a batch can hold prompts
of different lengths: they are padded on the left, padding slots are marked invalid and never attended to, and each
row's positions (for rotary or learned position embeddings) count only its real tokens.
"""
from __future__ import annotations

import torch

from fournil.errors import FournilError


def positions_and_mask(idx: torch.Tensor, cache: KVCache | None, valid: torch.Tensor | None, block_size: int):
    """What a Transformer's forward needs to place ``idx``: each token's position, and the attention mask (``None``
    for plain causal attention). Without a cache ``idx`` is a whole sequence; with one, it continues the cache."""
    T = idx.shape[1]
    end = T + (cache.length if cache else 0)
    if end > block_size:
        raise FournilError(f"input of {end} tokens is longer than the model's context of {block_size}")
    if cache is None:
        return torch.arange(T, device=idx.device)[None], None
    return cache.begin(valid if valid is not None else torch.ones_like(idx, dtype=torch.bool))


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, size: int, head_dim: int, device, dtype,
                 window: int | None = None):
        shape = (batch, n_kv_head, size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.size, self.window = size, window
        self.length = 0  # slots filled so far, the same for every row

    def begin(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Make room for the next ``valid.shape[1]`` tokens (``valid``: which of them are real, not padding).

        Returns each new token's position in its own sequence, and the attention mask of the new tokens over every
        filled slot (``None`` when plain causal attention is right: no padding, no window, and either one new token
        or an empty cache).
        """
        T = valid.shape[1]
        start, end = self.length, self.length + T
        if end > self.size:
            raise ValueError(f"the cache holds {self.size} tokens; {end} were asked for")
        self.valid[:, start:end] = valid
        positions = (self.valid[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
        plain = T == 1 or start == 0
        if plain and bool(self.valid[:, :end].all()) and (self.window is None or end <= self.window):
            return positions, None
        query = torch.arange(start, end, device=valid.device)[:, None]
        key = torch.arange(end, device=valid.device)[None, :]
        allowed = key <= query
        if self.window is not None:
            allowed &= query - key < self.window
        mask = allowed[None] & self.valid[:, None, :end]
        mask |= key == query  # a padding token sees itself, so its row of attention is never empty (no NaN)
        return positions, mask[:, None]  # (batch, 1 for every head, new tokens, filled slots)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values for ``layer``; returns every filled slot's keys and values."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T
