"""Weights in less memory for generation: bf16, or int8 with one scale per output channel.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth: 4 bytes per weight in
fp32, 2 in bf16, 1 in int8. The int8 layers keep a quarter of fp32's memory. For a few rows at a time (decoding)
they use PyTorch's int8 weight-only matrix-vector kernel, which reads the int8 weights directly and computes in bf16;
for many rows (a prompt's prefill) that kernel is slower than converting the weights to fp32 for a matrix product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError

PRECISIONS = ("float32", "bfloat16", "int8")
DECODE_ROWS = 32  # up to this many rows, the int8 matrix-vector kernel beats a dequantized fp32 product (measured)


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with a float scale per output row (the row's largest |w| / 127).

    Weight-only: the activations stay in float and the product is exact up to the weights' rounding. (Quantizing
    the activations too, as PyTorch's fbgemm kernels do, ran 1.6 times faster here but tripled SmolLM2's perplexity.)
    """

    tied = False  # the output layer of tied embeddings: an int8 copy of weights counted in the embeddings

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows <= DECODE_ROWS:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # on a CPU in fp32, even under bf16 autocast: CPUs without bf16 units multiply fp32 several times faster
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(compute), self.weight.to(compute)) * self.scale.to(compute)
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """``model`` with its weights in ``precision`` (in place; int8 computes in bf16); tied output weights are untied first, so the
    embeddings keep their precision and the output layer gets the new one."""
    if precision not in PRECISIONS:
        raise FournilError(f"unknown weight precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model.float()
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if not hasattr(model, "new_cache"):
        raise FournilError(f"int8 weights are for Transformers (gpt, llama); the {model.family} model is small enough")
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
                getattr(parent, name).tied = child.weight.data_ptr() in embedded  # a copy of the embeddings
    return model.to(torch.bfloat16)  # the rest (embeddings, norms, scales) in bf16, the kernel's activation type


def weight_bytes(model: nn.Module) -> int:
    """Memory the weights take, each counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = {b.data_ptr(): b.numel() * b.element_size() for m in model.modules() if isinstance(m, Int8Linear)
               for b in m.buffers()}
    return sum(seen.values()) + sum(buffers.values())
