"""What every model shares: ``forward(idx) -> logits`` of shape (B, T, vocab), a config, a parameter count."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError


class LanguageModel(nn.Module):
    """Base class: subclasses set ``family`` and implement ``forward``."""

    family = ""
    counts_only = False  # True for models that learn by counting in one pass (``fit``), not by gradient descent

    def num_params(self) -> int:
        """Parameters a learner would count: each weight once, tied weights once, counts of an n-gram table."""
        seen = {p.data_ptr(): p.numel() for p in self.parameters()}
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
        return next(iter(self.state_dict().values())).device


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
           causal: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention (keys and values may have fewer heads: grouped-query attention). While
    ``module.recorded`` is a list, the weights are computed explicitly, used, and appended to it, so that a picture
    of attention shows the computation the model really made."""
    gqa = k.shape[1] != q.shape[1]
    if getattr(module, "recorded", None) is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.float().softmax(-1).to(q.dtype)
    module.recorded.append(weights.detach())
    return weights @ v
