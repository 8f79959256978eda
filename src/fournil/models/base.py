"""What every model shares: ``forward(idx) -> logits`` of shape (B, T, vocab), or with ``targets`` (B, T) the
log-probability of each target; a config, a parameter count."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fournil.data.batches import IGNORE
from fournil.errors import FournilError

LOGITS_BUDGET = 2**24  # logits (positions x vocabulary) that exist at once while a loss is computed: 64 MB in fp32


def chunk_positions(vocab: int) -> int:
    """How many positions' logits fit ``LOGITS_BUDGET``: 341 for SmolLM2's 49,152 tokens, all of them for characters."""
    return max(1, LOGITS_BUDGET // vocab)


class LanguageModel(nn.Module):
    """Base class: subclasses set ``family`` and implement ``forward``."""

    family = ""
    counts_only = False  # True for models that learn by counting in one pass (``fit``), not by gradient descent
    checkpointing: bool | None = None  # Transformers: recompute each layer in the backward pass (None: no layers to)
    packs = False  # forward takes ``documents=``: rows packed with several documents each (fournil.data.batches.pack)

    def run_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        """``layer(*args)``; while training with ``checkpointing``, its activations are not kept but computed again
        in the backward pass (activation checkpointing: a third more computation for far less memory)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def num_params(self) -> int:
        """Parameters a learner would count: each weight once, tied weights once, counts of an n-gram table, and the
        weights that quantization keeps as buffers (not their scales, nor the quantized copy of tied embeddings)."""
        from fournil.generate.quantize import QuantizedLinear

        seen = {p.data_ptr(): p.numel() for p in self.parameters()}
        seen |= {m.weight.data_ptr(): m.in_features * m.out_features for m in self.modules()
                 if isinstance(m, QuantizedLinear) and not m.tied}
        return sum(seen.values())

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs per token (forward and backward), as the PaLM paper counts them for MFU: 6 per weight of
        the matrix products, plus attention's 12 * layers * width * context for Transformers."""
        positions = {id(m.weight) for name, m in self.named_modules() if name.endswith("wpe")}
        n = sum(p.numel() for p in self.parameters() if id(p) not in positions)
        cfg = getattr(self, "config", None)
        attention = 12 * cfg.n_layer * cfg.n_embd * context if hasattr(cfg, "n_head") else 0
        return 6 * n + attention

    @property
    def device(self) -> torch.device:
        """Where the weights are (asked at every generation step: cheap, unlike walking the state dict)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device


def target_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each target (B, T), 0 where there is none (``IGNORE``: a prompt, padding), from the
    states (B, T, width) the output layer ``head`` reads.

    When every position's logits would not fit ``LOGITS_BUDGET``, only positions with a target are computed, a chunk
    at a time, each chunk's logits computed again in the backward pass instead of kept: the (B, T, vocab) logits
    never exist whole. (For 8 x 512 tokens of SmolLM2's 49,152-token vocabulary they would be 0.8 GB in fp32, and
    several times that with their softmax and gradient.)
    """
    size = chunk_positions(getattr(head, "out_features", hidden.shape[-1]))
    if targets.numel() <= size:
        return chunk_logprobs(head, hidden, targets)
    keep = targets != IGNORE
    states, wanted = hidden[keep], targets[keep]
    found = torch.cat([checkpoint(chunk_logprobs, head, states[i : i + size], wanted[i : i + size], use_reentrant=False)
                       if torch.is_grad_enabled() else chunk_logprobs(head, states[i : i + size], wanted[i : i + size])
                       for i in range(0, len(wanted), size)])
    return torch.zeros(targets.shape, dtype=found.dtype, device=hidden.device).masked_scatter(keep, found)


def chunk_logprobs(head: nn.Module, states: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The log-probability of each ``wanted`` token (any shape), 0 where it is ``IGNORE``."""
    logits = head(states)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits.flatten(0, -2), wanted.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(wanted.shape)


def decoder_only(model, what: str) -> None:
    """Refuse, with the way out, what only a decoder-only language model can do."""
    if model.family == "seq2seq":
        raise FournilError(f"{what} needs a decoder-only language model; a seq2seq model writes a target for a source: "
                           f"`fournil sample RUN --prompt SOURCE` (--beam N for a beam search)")


def windows(idx: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """For each position t, the ``width`` tokens ending at t, left-padded with ``pad``: shape (B, T, width).

    This is the context a fixed-window model (n-gram, MLP) conditions on to predict token t + 1.
    """
    padded = F.pad(idx, (width - 1, 0), value=pad)
    return padded.unfold(1, width, 1)


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, dropout: float = 0.0, kernel: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (keys and values may have fewer heads: grouped-query attention).

    One new token over a cache whose ``kernel`` says so (:attr:`fournil.generate.cache.KVCache.kernel`) runs in
    fournil's CPU kernel (``generate/attention.cpp``), which reads the bf16 cache as it is: a compiled step of 8 rows
    of SmolLM2 in int4 took 12.7 ms that way against 14.9 written out (medians, alternated in one process).
    Elsewhere, written out as products for one new token on a CPU, where PyTorch's kernel costs several times the
    arithmetic (8 rows decoded 279 tokens/s instead of 202), and under a mask anywhere (a decoding step over a whole
    fixed-size cache); and while ``module.recorded`` is a list: the weights are then appended to it, so that a
    picture of attention shows the computation the model really made."""
    recording = getattr(module, "recorded", None) is not None
    if kernel and q.shape[2] == 1 and not recording and not dropout and (mask is None or mask.dtype == torch.bool):
        B, H, _, D = q.shape
        y = torch.ops.fournil.decode_attention(q.reshape(B, H, D).float().contiguous(), k, v,
                                               None if mask is None else mask.reshape(B, -1).contiguous())
        return y.view(B, H, 1, D).to(q.dtype)
    written_out = recording or q.shape[2] == 1 and not dropout and (mask is not None or q.device.type == "cpu")
    if not written_out:
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa)
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    # in fp32 on a CPU: its small bf16 products cost twice as much (and without bf16 units, far more)
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    grouped = q.reshape(B, kv_heads, H // kv_heads * T, D)  # the query heads that share a key/value head, together
    with torch.autocast(q.device.type, enabled=False):
        scores = (grouped.to(compute) @ k.to(compute).transpose(-2, -1) * (1 / math.sqrt(D))).view(B, H, T, S)
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.float().softmax(-1).to(compute)
        if recording:
            module.recorded.append(weights.detach())
        y = weights.view(B, kv_heads, H // kv_heads * T, S) @ v.to(compute)
    return y.view(B, H, T, D).to(q.dtype)
