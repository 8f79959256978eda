"""Weights in less memory for generation: bf16, or int8 with one scale per output channel.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth: 4 bytes per weight in
fp32, 2 in bf16, 1 in int8. The int8 layers run on PyTorch's fbgemm kernels, which also quantize each call's
activations to int8 on the fly (dynamic quantization).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fournil.errors import FournilError

PRECISIONS = ("float32", "bfloat16", "int8")


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with a float scale per output row (the row's largest |w| / 127)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().cpu()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        with warnings.catch_warnings():  # PyTorch marks quantized tensors deprecated; their CPU kernels are the fast ones
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.nbytes = w.numel() + 4 * len(w) + (0 if bias is None else 4 * len(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """``model`` with its weights in ``precision`` (in place); tied output weights are untied first, so the
    embeddings keep their precision and the output layer gets the new one."""
    if precision not in PRECISIONS:
        raise FournilError(f"unknown weight precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model.float()
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if model.device.type != "cpu":
        raise FournilError("int8 weights run on the CPU (fbgemm kernels); on a GPU use --dtype bfloat16")
    if not hasattr(model, "new_cache"):
        raise FournilError(f"int8 weights are for Transformers (gpt, llama); the {model.family} model is small enough")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Memory the weights take, each counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values()) + sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
