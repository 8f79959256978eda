"""Weights in less memory for generation: bf16, int8 with one scale per output channel, or int4 in groups of 32.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth: 4 bytes per weight in
fp32, 2 in bf16, 1 in int8, a little over half a byte in int4. On a CPU with VNNI the int8 layers multiply several
rows in integers (the activations in two int8 parts, see :class:`Int8Linear`); the int4 layers use PyTorch's int4
kernel for any number of rows.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError

PRECISIONS = ("float32", "bfloat16", "int8", "int4")
GROUP = 32  # int4: weights per scale and zero (llama.cpp's Q4_0/Q4_1 blocks are 32 too)
DECODE_ROWS = 32  # without exact integer products: up to this many rows, the int8 weight-only kernel beats fp32


class QuantizedLinear(nn.Module):
    """What the quantized linear layers share: a weight of ``out_features`` x ``in_features`` kept as buffers."""

    tied = False  # the output layer of tied embeddings: a quantized copy of weights counted in the embeddings
    in_features = out_features = 0


@functools.cache
def exact_integer_products() -> bool:
    """Whether this CPU's int8 products are exact for any int8 values. With VNNI they are; without (AVX2, or AVX512
    before VNNI) pairs of products are added in 16 bits, and 127 x 127 twice, shifted to unsigned, saturates."""
    a = torch.tensor([[127] * 64, [-127] * 64], dtype=torch.int8)
    w = torch.full((16, 64), 127, dtype=torch.int8)
    w[8:] = -127
    return torch.equal(torch._int_mm(a, w.t()), (a.long() @ w.t().long()).int())


class Int8Linear(QuantizedLinear):
    """A linear layer whose weight is int8 with a float scale per output row (the row's largest |w| / 127).

    On a CPU one row (a sequence decoding alone) goes through PyTorch's int8 weight-only kernel, which multiplies in
    bf16: the fewest operations, and eager decoding pays for each. Several rows (a batch, a prompt) are multiplied in
    integers (int8 by int8 into int32; with VNNI, 4 products where float has one), each row's activations quantized
    as they come in two int8 parts: the row's values in 127 steps of its largest, then, in 127 steps of its own, what
    that rounding lost. One part alone cost SmolLM2 3.3 % of perplexity, two 0.7 %; both parts go through one
    product, so the weights are still read once. Eight rows of SmolLM2's output layer took 3.2 ms there instead of
    the weight-only kernel's 5.8. Each row is quantized on its own and int32 sums are exact, so a row's result does
    not depend on the other rows. A CPU whose integer products are not exact (no VNNI) multiplies a few rows with
    the weight-only kernel, and many (a prompt) with the weights converted to fp32, which it multiplies faster.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.integers = exact_integer_products()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and self.integers and rows > 1:
            flat = x.reshape(rows, self.in_features).float()
            high_step = flat.abs().amax(1, keepdim=True).clamp(min=1e-20) / 127
            high = (flat / high_step).round()
            rest = flat - high * high_step
            low_step = rest.abs().amax(1, keepdim=True).clamp(min=1e-20) / 127
            low = (rest / low_step).round()
            both = torch._int_mm(torch.cat([high, low]).to(torch.int8), self.weight.t()).float()
            y = (both[:rows] * high_step + both[rows:] * low_step) * self.scale
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        elif x.device.type == "cpu" and rows <= DECODE_ROWS:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # on a CPU in fp32, even under bf16 autocast: CPUs without bf16 units multiply fp32 several times faster
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(compute), self.weight.to(compute)) * self.scale.to(compute)
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is 4-bit, with a bf16 scale and zero for each group of ``GROUP`` weights of a row
    (the group's minimum is code 0, its maximum code 15, as llama.cpp's Q4_1).

    Half the bytes of int8, and decoding reads every weight once: SmolLM2 decoded 1.15 times as fast as in int8 on a
    2-core AVX512-BF16 CPU (the rest of each step is Python and small operations). PyTorch's CPU kernel (the one
    torchao's int4 CPU layout calls) reads the packed codes directly, computes in bf16, and for many rows (a prompt)
    is about as fast as a bf16 product.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        # the kernel wants inputs in whole groups and outputs in sixteens: a narrow model's weights are padded with zeros
        self.pad = -self.in_features % GROUP
        w = F.pad(linear.weight.detach().float(), (0, self.pad, 0, -self.out_features % 16))
        groups = w.view(w.shape[0], -1, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        # the kernel's convention: w = (code - 8) * scale + zero, with scale and zero in bf16; the codes are chosen
        # for the rounded scale and zero, not before their rounding (which cost 3 % of SmolLM2's perplexity)
        scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        codes = ((groups - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(codes.view(w.shape), 8))
        self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        flat = F.pad(flat, (0, self.pad)) if self.pad else flat
        y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scale_zero)[:, : self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """``model`` with its weights in ``precision`` (in place; int8 and int4 compute in bf16, with the products that
    read the same input fused where a model can); tied output weights are untied first, so the embeddings keep
    their precision and the output layer gets the new one."""
    if precision not in PRECISIONS:
        raise FournilError(f"unknown weight precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model.float()
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if not hasattr(model, "new_cache"):
        raise FournilError(f"{precision} weights are for Transformers (gpt, llama); the {model.family} model is small enough")
    if precision == "int4" and model.device.type != "cpu":
        raise FournilError("int4 weights are for decoding on a CPU; on a GPU use --dtype bfloat16 or int8")
    for m in list(model.modules()):
        if hasattr(m, "fuse"):
            m.fuse()
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                # int4's output layer is int8: in 4 bits it cost SmolLM2 3.7 % of perplexity, in 8 bits nothing
                kind = Int4Linear if precision == "int4" and name != "lm_head" else Int8Linear
                setattr(parent, name, kind(child))
                getattr(parent, name).tied = child.weight.data_ptr() in embedded  # a copy of the embeddings
    return model.to(torch.bfloat16)  # the rest (embeddings, norms, scales) in bf16, the kernel's activation type


def weight_bytes(model: nn.Module) -> int:
    """Memory the weights take, each counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = {b.data_ptr(): b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear)
               for b in m.buffers()}
    return sum(seen.values()) + sum(buffers.values())
