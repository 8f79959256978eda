"""What every model shares: ``forward(idx) -> logits`` of shape (B, T, vocab), or with ``targets`` (B, T) the
log-probability of each target; a config, a parameter count."""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fournil import kernels
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
    packs = False  # forward takes ``sees=``: rows of several sequences each (fournil.data.batches.pack)
    exact: tuple[str, ...] = ()  # buffers that are not weights: a cast of the model (``--dtype``) keeps their dtype

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.bfloat16()``...: the ``exact`` buffers move, but keep their dtype."""
        kept = {name: getattr(self, name) for name in self.exact}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            if getattr(self, name).dtype != before.dtype:
                setattr(self, name, before.to(getattr(self, name).device))
        return self

    def upgrade(self, tensors: dict) -> dict:
        """Saved tensors as this version of the model keeps them (a model whose storage changed reads older files)."""
        return tensors

    def run_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        """``layer(*args)``; while training with ``checkpointing``, its activations are not kept but computed again
        in the backward pass (activation checkpointing: a third more computation for far less memory)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def num_params(self) -> int:
        """Parameters a learner would count: each weight once, tied weights once, counts of an n-gram table, and the
        weights and biases that quantization keeps as buffers (not their scales, nor the quantized copy of tied
        embeddings)."""
        from fournil.generate.quantize import QuantizedLinear

        seen = {p.data_ptr(): p.numel() for p in self.parameters()}
        for m in self.modules():
            if isinstance(m, QuantizedLinear) and not m.tied:
                seen[m.weight.data_ptr()] = m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
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
    def reads(self) -> int:
        """How many tokens one prediction reads: the context a learner compares across the zoo (a Transformer's
        block size; an MLP's window and an n-gram's n - 1 are shorter than the rows they train on)."""
        return self.config.block_size

    @property
    def device(self) -> torch.device:
        """Where the weights are (asked at every generation step: cheap, unlike walking the state dict)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device


def eager(fn):
    """``torch.compiler.disable(fn)``, made when a compiler traces ``fn``: importing the compiler at start-up, as the
    decorator does, cost every command 0.9 s."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


@eager  # a loop over chunks, into buffers: nothing for a compiler to fuse, much to unroll
def target_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each target (B, T), 0 where there is none (``IGNORE``: a prompt, padding), from the
    states (B, T, width) that the output layer ``head`` reads: a linear layer, or ``nn.Identity`` for states that
    are logits already. Only positions with a target are computed (:class:`TargetLogprobs`)."""
    keep = targets != IGNORE
    linear = isinstance(head, nn.Linear)
    if torch.is_grad_enabled() and not linear and not isinstance(head, nn.Identity):
        raise FournilError(f"the next-token loss cannot train through an output layer of type {type(head).__name__}: "
                           f"only a linear layer's gradient is written out (train the model unquantized)")
    weight, bias = (head.weight, head.bias) if linear else (None, None)
    if keep.all():  # (no copy of the states, and of their gradient: the whole of it when the states are logits)
        return TargetLogprobs.apply(hidden.flatten(0, -2), targets.flatten(), head, weight, bias).view(targets.shape)
    found = TargetLogprobs.apply(hidden[keep], targets[keep], head, weight, bias)
    return torch.zeros(targets.shape, dtype=found.dtype, device=hidden.device).masked_scatter(keep, found)


class TargetLogprobs(torch.autograd.Function):
    """log softmax(head(states))[wanted], a chunk of positions at a time (as many as ``LOGITS_BUDGET`` holds), in
    buffers made once, its gradient written out rather than traced.

    Each chunk's logits are computed again in the backward pass rather than kept: the (positions, vocab) logits
    never exist whole (for 8 x 512 tokens of SmolLM2's 49,152-token vocabulary they would be 0.8 GB in fp32, and
    several times that with their softmax and gradient). With p = softmax(logits), the gradient of a log-probability
    is onehot(wanted) - p: times the head's weight, the states'; times the states, the weight's. Traced through
    autograd and checkpointed instead, each chunk made several tensors of its logits' size, each new memory the
    system had to clear: 1,536 positions of SmolLM2 took 1.02 s forward and backward in bf16 (556,000 page faults),
    against 0.58 s (132,000) now."""

    @staticmethod
    def forward(ctx, states, wanted, head, weight, bias):
        kind, plain = states.device.type, states if weight is None else weight  # a linear head's product is in
        ctx.dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else plain.dtype  # this dtype
        found, buffers = None, {}
        ctx.linear_head = linear(weight, bias, ctx.dtype)  # kept for the backward pass: one cast of the weight
        for rows, logits in TargetLogprobs.chunks(states, head, ctx.linear_head, buffers):
            a, b = (scratch(buffers, name, logits.shape, exact(logits.dtype), logits) for name in "ab")
            if found is None:
                found, ctx.logsumexp = (a.new_empty(len(states)) for _ in range(2))
            at = wanted[rows].unsqueeze(1)
            torch.log_softmax(a.copy_(logits), -1, out=b)
            found[rows] = b.gather(1, at).squeeze(1)
            ctx.logsumexp[rows] = a.gather(1, at).squeeze(1) - found[rows]
        ctx.save_for_backward(states, wanted, weight, bias)
        return found if found is not None else states.new_empty(0, dtype=exact(ctx.dtype))

    @staticmethod
    def backward(ctx, grad):
        states, wanted, weight, bias = ctx.saved_tensors
        need_states, _, _, need_weight, need_bias = ctx.needs_input_grad
        out_states = torch.zeros_like(states) if need_states else None
        out_weight = None  # made by the first chunk: a (vocab, width) tensor of zeros costs a pass of its own
        out_bias = torch.zeros_like(bias) if need_bias else None
        linear_head, buffers = ctx.linear_head, {}
        for rows, logits in TargetLogprobs.chunks(states, nn.Identity(), linear_head, buffers):
            at = wanted[rows].unsqueeze(1)
            g = scratch(buffers, "a", logits.shape, exact(logits.dtype), logits)
            g.copy_(logits).sub_(ctx.logsumexp[rows].unsqueeze(1)).exp_()  # p
            g.scatter_add_(1, at, g.new_full(at.shape, -1.0)).mul_(-grad[rows].unsqueeze(1).to(g.dtype))
            if g.dtype != logits.dtype:  # the logits' gradient, in their precision
                g = scratch(buffers, "g", logits.shape, logits.dtype, logits).copy_(g)
            if linear_head is None:  # the states are the logits
                if need_states:
                    out_states[rows] = g
                continue
            w = linear_head[0]
            if need_states:
                out_states[rows] = g @ w
            if need_weight and g.dtype == weight.dtype:
                out_weight = g.t() @ states[rows] if out_weight is None else out_weight.addmm_(g.t(), states[rows])
            elif need_weight:  # in the logits' precision, summed in the weight's (an add of two dtypes makes a temporary)
                product = torch.mm(g.t(), states[rows].to(g.dtype), out=scratch(buffers, "w", w.shape, g.dtype, w))
                if out_weight is None:
                    out_weight = product.to(weight.dtype)
                else:
                    out_weight += scratch(buffers, "sum", w.shape, weight.dtype, w).copy_(product)
            if need_bias:
                out_bias += g.sum(0, dtype=out_bias.dtype)
        if need_weight and out_weight is None:  # no position at all
            out_weight = torch.zeros_like(weight)
        return out_states, None, None, out_weight, out_bias

    @staticmethod
    def chunks(states, head, linear_head, buffers: dict):
        """(a chunk's rows, their logits) for each chunk of positions: a linear head's (``linear_head``: its weight
        and bias) computed into a buffer, else ``head``'s."""
        vocab = len(linear_head[0]) if linear_head else getattr(head, "out_features", states.shape[-1])
        size = chunk_positions(vocab)
        with torch.no_grad():
            for i in range(0, len(states), size):
                s = states[i : i + size]
                if linear_head:
                    w, b = linear_head
                    out = scratch(buffers, "logits", (len(s), vocab), w.dtype, w)
                    s = s.to(w.dtype)
                    logits = torch.mm(s, w.t(), out=out) if b is None else torch.addmm(b, s, w.t(), out=out)
                else:
                    logits = head(s)
                yield slice(i, i + size), logits


def linear(weight: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype):
    """A linear head's weight and bias in ``dtype``, the precision autocast computes it in (None without a weight)."""
    return None if weight is None else tuple(t if t is None else t.to(dtype) for t in (weight, bias))


def exact(dtype: torch.dtype) -> torch.dtype:
    """The precision a softmax is taken in: fp32, or fp64 for fp64 logits."""
    return torch.promote_types(dtype, torch.float32)


def scratch(buffers: dict, name: str, shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` on ``like``'s device, made at the first (largest) chunk and reused by the next ones:
    memory that large, new at each allocation, is mapped and cleared by the system every time."""
    if name not in buffers:
        buffers[name] = like.new_empty(shape, dtype=dtype)
    return buffers[name][: shape[0]]


class Dropout(nn.Dropout):
    """``nn.Dropout``, on a CPU in fournil's kernel where it is built (``kernels/dropout.cpp``): each element's draw
    is a hash of a seed and its index, on every core, where PyTorch's come from one generator on one core. A LoRA
    layer's dropout in a step of SmolLM2 (8 rows of 200 tokens) took 5 ms that way, against 0.15 ms for its product.
    The seed is drawn from PyTorch's generator: ``torch.manual_seed`` makes the masks, and a checkpointed layer
    recomputed in the backward pass draws the same. (A compiled model's dropout is the compiler's.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p) or x.device.type != "cpu" or torch.compiler.is_compiling() \
                or not kernels.built():
            return super().forward(x)
        return HashedDropout.apply(x, self.p)


class HashedDropout(torch.autograd.Function):
    """The kernel's dropout; its gradient is the same mask (the same seed) applied to the output's gradient."""

    @staticmethod
    def forward(ctx, x, p: float):
        ctx.p, ctx.seed = p, int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        return torch.ops.fournil.dropout(x.contiguous(), p, ctx.seed)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.fournil.dropout(grad.contiguous(), ctx.p, ctx.seed), None


def at_least(config, smallest: int, *names: str) -> None:
    """Refuse a size of ``config`` below ``smallest``, naming the flag that sets it: a model of 0 heads or a negative
    width fails deep in PyTorch, or trains with no weights at all."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < smallest:
            raise FournilError(f"--{name.replace('_', '-')} must be at least {smallest} (got {value})")


def decoder_only(model, what: str) -> None:
    """Refuse, with the way out, what only a decoder-only language model can do."""
    if model.family == "seq2seq":
        raise FournilError(f"{what} needs a decoder-only language model; a seq2seq model writes a target for a source: "
                           f"`fournil sample RUN --prompt SOURCE` (--beam N for a beam search), or POST /predict to "
                           f"`fournil serve RUN`")


def windows(idx: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """For each position t, the ``width`` tokens ending at t, left-padded with ``pad``: shape (B, T, width).

    This is the context a fixed-window model (n-gram, MLP) conditions on to predict token t + 1.
    """
    padded = F.pad(idx, (width - 1, 0), value=pad)
    return padded.unfold(1, width, 1)


BF16_ATTENTION_FROM = 512  # query tokens: below, a CPU's bf16 attention with gradients is the slower


def trains_attention_in_fp32(q: torch.Tensor) -> bool:
    """Whether attention over ``q``, which would run in bf16 on a CPU with gradients, computes in fp32 instead: over
    fewer than ``BF16_ATTENTION_FROM`` tokens, where PyTorch's bf16 kernel, forward and backward, took 2 to 12 times
    as long as fp32's on a 2-core Xeon with AMX (casts included; 64 rows of 16 tokens in 6 heads of 64: 17.7 ms
    against 1.6; packed rows of 300 tokens, 1.2 times). From 512 causal tokens without a mask, bf16 ran 1.3 to 1.5
    times as fast. The fp32 copies kept for the backward pass cost little: a LoRA step of SmolLM2 on a row of 300
    tokens kept 573 MiB instead of 547."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or q.shape[-2] >= BF16_ATTENTION_FROM:
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, dropout: float = 0.0, kernel: int = 0) -> torch.Tensor:
    """Scaled dot-product attention (keys and values may have fewer heads: grouped-query attention).

    One new token over a cache whose ``kernel`` says so (:attr:`fournil.generate.cache.KVCache.kernel`, the level of
    :func:`fournil.kernels.instructions`) runs in fournil's CPU kernel (``kernels/attention.cpp``), which reads the
    bf16 cache as it is: a compiled step of 8 rows of SmolLM2 in int4 took 12.7 ms that way against 14.9 written out
    (medians, alternated in one process, AVX512).
    Elsewhere, written out as products for one new token on a CPU, where PyTorch's kernel costs several times the
    arithmetic (8 rows decoded 279 tokens/s instead of 202), and under a mask anywhere (a decoding step over a whole
    fixed-size cache); and while ``module.recorded`` is a list: the weights are then appended to it, so that a
    picture of attention shows the computation the model really made."""
    recording = getattr(module, "recorded", None) is not None
    if kernel and q.shape[2] == 1 and not recording and not dropout and (mask is None or mask.dtype == torch.bool):
        B, H, _, D = q.shape
        y = torch.ops.fournil.decode_attention(q.reshape(B, H, D).float().contiguous(), k, v,
                                               None if mask is None else mask.reshape(B, -1).contiguous(), kernel == 2)
        return y.view(B, H, 1, D).to(q.dtype)
    written_out = recording or q.shape[2] == 1 and not dropout and (mask is not None or q.device.type == "cpu")
    if not written_out:
        gqa = k.shape[1] != q.shape[1]
        if not trains_attention_in_fp32(q):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                                  enable_gqa=gqa)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                               dropout_p=dropout, enable_gqa=gqa)
        return y.to(q.dtype)
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


def packed_width(model) -> int | None:
    """The width of the rows into which a batch's short documents are packed for ``model``
    (:func:`fournil.data.batches.pack`), or None if it cannot keep them apart: its embedding's width, within its
    context, since attention over a row of w tokens costs about w / (6 n_embd) of its linear layers' work, which wider
    rows would spend on what packing saves."""
    return min(model.config.block_size, model.config.n_embd) if model.packs else None


def shares_prompts(model) -> bool:
    """Whether ``model`` can read a prompt once for the documents that start with it (a batch's system prompt, a
    pair's prompt for both answers: :func:`fournil.data.batches.pack`): it packs, and has no sliding window (which
    counts the distance between two tokens in the row, and the rejected answer is far from its prompt there)."""
    return model.packs and getattr(model.config, "sliding_window", None) is None
