"""The key/value cache: what attention has already computed for earlier tokens, kept so each new token costs one step.

Preallocated (``batch`` rows of ``size`` slots per layer, grown when needed). Rows can hold sequences of different
lengths: each row's tokens end at the same column, the slots before them are marked invalid and never attended to,
and each row's positions (for rotary or learned position embeddings) count only its real tokens. A view of some rows
shares the memory, so one forward pass can read into or extend a subset of the rows.
"""
from __future__ import annotations

import torch

from fournil.errors import FournilError
from fournil import kernels


def half_context(block: int) -> int:
    """The tokens of a full context of ``block`` that a text goes on from (its last half, at least one): generation
    past the context refills from them, and scores of a text longer than it come from windows this far apart."""
    return max(1, block // 2)


def positions_and_mask(idx: torch.Tensor, cache: KVCache | None, valid: torch.Tensor | None, block_size: int,
                       sees: torch.Tensor | None = None):
    """What a Transformer's forward needs to place ``idx``: each token's position, and the attention mask (``None``
    for plain causal attention). Without a cache ``idx`` is a whole sequence; with one, it continues the cache.
    ``sees`` (B, T, T) says which earlier tokens each token attends to (itself included), for rows that hold more
    than one sequence: packed documents, and answers that follow a prompt they share
    (:func:`fournil.data.batches.pack`). A token's position is then the number of tokens it sees before it, as if
    it were in a row of its own."""
    T = idx.shape[1]
    if sees is not None:
        positions = sees.sum(-1) - 1
        end = int(positions.max()) + 1
    else:
        end = T + (cache.length if cache else 0)
    if end > block_size:
        raise FournilError(f"input of {end} tokens is longer than the model's context of {block_size}")
    if sees is not None:
        return positions, sees[:, None]
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
        self.first_rows = None  # (rows, keys, values): the first rows of each layer, for decoding steps (Fixed)
        # whether one new token's attention over this cache runs in fournil's CPU kernel, and with which instructions
        # (kernels.instructions' level; decided here, once, and not in the forward pass, which may be being compiled)
        self.kernel = kernels.attention(self.valid.device, dtype, head_dim)

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

    def rows(self, start: int, stop: int, length: int | None = None) -> KVCache:
        """Rows ``start:stop`` as a cache of their own that shares this one's memory, filled up to ``length``."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[start:stop] for t in self.k], [t[start:stop] for t in self.v]
        view.valid, view.size, view.window, view.kernel = self.valid[start:stop], self.size, self.window, self.kernel
        view.length, view.first_rows = self.length if length is None else length, None
        return view

    def resize(self, batch: int, size: int, rows: int | None = None) -> None:
        """Room for ``batch`` rows of ``size`` slots, keeping what the first ``rows`` rows hold (all by default): the
        rows a scheduler does not use are not copied (one sequence in 8 rows: half the time)."""
        b = min(batch, self.valid.shape[0] if rows is None else rows)
        s = min(size, self.size, self.length)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                store[i] = t.new_zeros(batch, t.shape[1], size, t.shape[3])
                store[i][:b, :, :s] = t[:b, :, :s]
        valid = self.valid.new_zeros(batch, size)
        valid[:b, :s] = self.valid[:b, :s]
        self.valid, self.size, self.first_rows = valid, size, None

    def move(self, src: int, dst: int) -> None:
        """Row ``src``'s tokens into row ``dst``."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.valid[dst] = self.valid[src]

    def keys_values(self, row: int, n: int) -> list[torch.Tensor]:
        """Row ``row``'s first ``n`` tokens' keys, then values, of every layer (copies: (heads, n, head_dim) each)."""
        cols = self.valid[row, : self.length].nonzero()[:n, 0]
        return [t[row, :, cols] for t in self.k + self.v]

    def put(self, keys_values: list[torch.Tensor], row: int, end: int) -> None:
        """Tokens' keys and values (:meth:`keys_values`) into row ``row``, ending at column ``end`` (positions count
        real tokens only, so the keys of a sequence's first tokens are the same in any row and at any column)."""
        n = keys_values[0].shape[1]
        for t, x in zip(self.k + self.v, keys_values):
            t[row, :, end - n : end] = x
        self.valid[row, end - n : end] = True

    def align(self, end: int, rows: int) -> None:
        """Move each of the first ``rows`` rows' tokens, in order, to end at column ``end``: reclaims the columns no row
        needs (or makes room before them) without changing any token's position or neighbours."""
        if end > self.size:
            self.resize(self.valid.shape[0], end, rows)
        for r in range(rows):
            cols = self.valid[r, : self.length].nonzero()[:, 0]
            n = len(cols)
            if n > end:
                raise ValueError(f"row {r} holds {n} tokens, more than {end} columns")
            for t in self.k + self.v:
                t[r, :, end - n : end] = t[r, :, cols]
            self.valid[r] = False
            self.valid[r, end - n : end] = True
        self.length = end


class Fixed:
    """Rows ``0:rows`` of a :class:`KVCache` reading one new token each, into the cache's next column, attending to
    every slot under a mask. Stands where the cache does in a forward pass, with the same shapes whatever the column,
    so that a compiled decoding step (:mod:`fournil.generate.compiled`) runs the same code at every step."""

    length = 0  # (what the context check counts: the scheduler keeps each row within the model's context)

    def __init__(self, cache: KVCache, rows: int):
        column, end = cache.length, cache.length + 1
        if end > cache.size:
            raise ValueError(f"the cache holds {cache.size} tokens; {end} were asked for")
        cache.valid[:rows, column] = True
        filled = cache.valid[:rows, :end]
        # (detached: the step then sees tensors of their own, not views of the cache's, whose shape it would depend on;
        # made once for every step of as many rows until the cache grows: 60 views of SmolLM2 cost 0.2 ms a step)
        if cache.first_rows is None or cache.first_rows[0] != rows:
            cache.first_rows = rows, [t[:rows].detach() for t in cache.k], [t[:rows].detach() for t in cache.v]
        self.rows, self.k, self.v = cache.first_rows
        self.kernel = cache.kernel
        self.positions = filled.sum(-1, keepdim=True) - 1
        self.mask = torch.zeros(rows, 1, 1, cache.size, dtype=torch.bool, device=filled.device)
        self.mask[:, 0, 0, :end] = filled
        if cache.window is not None:
            self.mask[..., : max(0, end - cache.window)] = False
        self.column = torch.tensor([column], device=filled.device)

    def begin(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions, self.mask

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.column, k)
        self.v[layer].index_copy_(2, self.column, v)
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        pass


class Packed:
    """Several sequences that share a prefix, packed one after the other in each row: ``prefix, a, b, ...``, where
    ``a`` and ``b`` each go on from the prefix and never see each other. Stands where a :class:`KVCache` does in a
    forward pass (it keeps nothing), so that the prefix is read once for all its continuations, in the same pass.

    ``rows``: for each row, the length of its prefix and of each sequence after it; rows are padded on the right to
    the longest."""

    length, kernel = 0, 0

    def __init__(self, rows: list[tuple[int, list[int]]], window: int | None, device):
        width = max(prefix + sum(parts) for prefix, parts in rows)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        branch = torch.full((len(rows), width), -2)  # -1: the prefix, every branch sees it; -2: padding
        for r, (prefix, parts) in enumerate(rows):
            positions[r, :prefix], branch[r, :prefix] = torch.arange(prefix), -1
            at = prefix
            for b, n in enumerate(parts):
                positions[r, at:at + n], branch[r, at:at + n] = torch.arange(prefix, prefix + n), b
                at += n
        col = torch.arange(width)
        mine, theirs = branch[:, :, None], branch[:, None, :]
        mask = (col[None, :] <= col[:, None]) & ((theirs == -1) | (theirs == mine)) & (mine != -2)
        if window is not None:
            mask &= positions[:, :, None] - positions[:, None, :] < window
        mask |= col[None, :] == col[:, None]  # padding sees itself: no empty row of attention
        self.positions, self.mask = positions.to(device), mask[:, None].to(device)

    def begin(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions, self.mask

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def advance(self, T: int) -> None:
        pass
