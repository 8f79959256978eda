"""A Llama-family decoder: rotary positions, RMSNorm, a SwiGLU MLP and grouped-query attention.

The same file runs Llama 2 and 3, Mistral (sliding-window attention), Qwen2 (biases on q, k, v), Qwen3 (an RMSNorm
on each head's queries and keys) and SmolLM2, and trains from scratch like ``gpt``. Weight names follow Hugging Face's
``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``...), so importing and exporting is a table of names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError
from fournil.generate.cache import KVCache, positions_and_mask
from fournil.models.base import LanguageModel, at_least, attend, target_logprobs


@dataclass
class LlamaConfig:
    vocab_size: int = 0
    block_size: int = 0  # the longest context, in tokens (Hugging Face: max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # key/value heads; fewer than n_head is grouped-query attention, 1 is multi-query
    n_embd: int = 64
    head_dim: int = 0  # 0: n_embd // n_head
    intermediate_size: int = 0  # width of the SwiGLU MLP; 0: about 8/3 of n_embd, a multiple of 32
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3 style: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    o_bias: bool = False  # a bias on the attention output projection (Llama's attention_bias sets both)
    mlp_bias: bool = False
    sliding_window: int | None = None  # each token sees at most this many tokens, itself included (Mistral)
    qk_norm: bool = False  # an RMSNorm on each head's queries and keys before the rotation (Qwen3)

    def __post_init__(self):
        at_least(self, 1, "n_head", "n_kv_head", "n_embd", "sliding_window")
        at_least(self, 0, "n_layer", "head_dim", "intermediate_size")  # (0 sizes: derived from n_embd below)
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise FournilError(f"--rope-theta and --rms-norm-eps must be above 0 (got {self.rope_theta:g} and "
                               f"{self.rms_norm_eps:g})")
        if self.n_head % self.n_kv_head:
            fit = max(d for d in range(1, self.n_kv_head) if self.n_head % d == 0)
            raise FournilError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): give "
                               f"--n-kv-head {fit}, say")
        if not self.head_dim:
            if self.n_embd % self.n_head:
                raise FournilError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise FournilError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.intermediate_size:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """The rotation speed of each pair of channels, with Llama 3's rescaling of the slow ones if asked (computed on
    the CPU, even for a model built on the meta device to be loaded)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind != "llama3":
        raise FournilError(f"rope scaling {kind!r} is not supported; fournil knows 'default' and 'llama3'")
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slow = inv_freq / factor
    smooth = (old_context / wavelen - low) / (high - low)
    mixed = (1 - smooth) * slow + smooth * inv_freq
    out = torch.where(wavelen > old_context / low, slow, inv_freq)
    middle = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return torch.where(middle, mixed, out).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves convention (Hugging Face): channel i pairs with channel i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """Scale by the inverse root mean square, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    recorded = None  # a list while attention weights are recorded (fournil.evaluate.attention)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.sliding_window
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.n_embd, bias=config.o_bias)
        self.q_norm, self.k_norm = (RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
                                    for _ in range(2))
        self.qkv = None  # q, k and v in one product, once fused for generation (:meth:`fuse`)

    def fuse(self, layer: Callable[..., nn.Module]) -> None:
        """Compute q, k and v in one product instead of three, by ``layer`` made of the three (a quantized one:
        :func:`fournil.generate.quantize.quantize_layers`): for decoding, where a small layer's product costs mostly
        its call (SmolLM2's three int4 products: 65 us a token, fused 30 us). The three layers' names go."""
        if self.qkv is not None:
            return
        self.sizes = [p.out_features for p in (self.q_proj, self.k_proj, self.v_proj)]
        self.qkv = layer(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if self.qkv is None else \
            self.qkv(x).split(self.sizes, -1)
        q, k = q.view(B, T, self.n_head, self.head_dim), k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # the cache's mask keeps the window
            k, v = cache.store(layer, k, v)
        elif self.window is not None and T > self.window:
            i = torch.arange(T, device=x.device)
            window = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            mask = window if mask is None else mask & window
        y = attend(self, q, k, v, mask, causal=mask is None and T > 1, kernel=cache.kernel if cache is not None else 0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.gate_up = None  # gate and up in one product, once fused for generation (:meth:`fuse`)

    def fuse(self, layer: Callable[..., nn.Module]) -> None:
        """Compute gate and up in one product instead of two, by ``layer`` made of the two, as the attention's q, k
        and v: their input is quantized once, and one call shares the work out to the threads. The two layers' names
        go."""
        if self.gate_up is not None:
            return
        self.gate_up = layer(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_proj(x), self.up_proj(x)) if self.gate_up is None else self.gate_up(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):
    family = "llama"
    checkpointing = False
    packs = True
    # the rotary frequencies stay in fp32, as Hugging Face's models keep them: rounded to bf16 with the weights,
    # SmolLM2's were off by up to 0.33 %, and the angle between positions 1,000 apart by up to 1.4 radians (the bf16
    # model's KL to the fp32 one, at positions 2,048-4,096 of Shakespeare: 0.0014 with them rounded, 0.0012 kept)
    exact = ("inv_freq",)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([DecoderLayer(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # residual projections scaled by depth, as in GPT-2
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def new_cache(self, batch: int, size: int, dtype: torch.dtype) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_kv_head, size, c.head_dim, self.device, dtype, c.sliding_window)

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
        positions, mask = positions_and_mask(idx, cache, valid, self.config.block_size, sees)
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (batch, 1 for every head, T, head_dim)
        x = self.model.embed_tokens(idx)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = self.run_layer(layer, x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.model.norm(x)
