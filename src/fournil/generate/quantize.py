"""Weights in less memory for generation: bf16, int8 with one scale per output channel, or int4 in groups of 32.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth: 4 bytes per weight in
fp32, 2 in bf16, 1 in int8, a little over half a byte in int4. Several rows at once (a batch) are bound by
arithmetic instead: on an x86 CPU with AVX2 the int8 and int4 layers multiply in integers (:mod:`fournil.kernels`),
elsewhere (ARM, no C++ compiler, a GPU) with PyTorch's kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fournil.errors import FournilError
from fournil import kernels

PRECISIONS = ("float32", "bfloat16", "int8", "int4")
GROUP = kernels.GROUP  # int4: weights per scale and zero, the kernel's groups (llama.cpp's Q4 blocks are 32 too)
DECODE_ROWS = 32  # without fournil's kernel: up to this many rows, PyTorch's int8 weight-only kernel beats fp32


class QuantizedLinear(nn.Module):
    """What the quantized linear layers share: a weight of ``out_features`` x ``in_features`` kept as buffers, made
    from one linear layer or from several that read the same input (fused: their outputs one after the other)."""

    tied = False  # the output layer of tied embeddings: a quantized copy of weights counted in the embeddings
    # the output layer: its scores in fp32, as the kernels give them. Rounded to bf16, scores of 8 to 32 (a model's
    # largest) come in steps of 1/16 to 1/8: the rounding decided near ties, and log-probabilities came in those steps
    # (SmolLM2's perplexity against fp32 weights: int8 +0.65 %, int4 +0.28 %; with fp32 scores +0.45 %, +0.19 %)
    scores = False

    def __init__(self, parts: tuple[nn.Linear, ...]):
        super().__init__()
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach().float() for p in parts])
        self.register_buffer("bias", bias)

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The product ``y`` of input ``x`` in the activations' precision (the scores in fp32), with the bias."""
        y = y.to(torch.float32 if self.scores else x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Linear(QuantizedLinear):
    """A linear layer whose weight is int8 with a scale per output row (the row's largest |w| / 127, in bf16).

    On a CPU with AVX2 it multiplies in integers (:mod:`fournil.kernels`), each row's activations quantized to
    int8 in groups of 32, its codes packed without a scale per group (the row's is applied once, at the end): 8 rows
    of SmolLM2's output layer took 1.1 ms with VNNI on 2 cores (1.3 with a scale and zero per group), against 5.6
    with PyTorch's int8 weight-only kernel. Elsewhere up to ``DECODE_ROWS`` rows go through that kernel, which
    multiplies in bf16, and more (a prompt) in fp32, which CPUs without bf16 units do several times faster.
    """

    def __init__(self, *parts: nn.Linear):
        super().__init__(parts)
        # multiplied by fournil's kernel with AVX2's instructions (1) or AVX512-VNNI's (2); 0: by PyTorch's
        self.kernel = kernels.instructions() if parts[0].weight.device.type == "cpu" else 0
        if self.kernel:
            weight, scale = kernels.quantized([p.weight for p in parts], 8)
        else:
            codes, scale = int8_codes(joined(parts))
            weight = codes.to(torch.int8)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.kernel:
            y = kernels.linear(x, self.weight, self.out_features, self.scale, self.kernel == 2)
        elif x.device.type == "cpu" and rows <= DECODE_ROWS:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:  # on a CPU in fp32, even under bf16 autocast: CPUs without bf16 units multiply fp32 several times faster
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(compute), self.weight.to(compute)) * self.scale.to(compute)
        return self.finish(y, x)


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is 4-bit, with a bf16 scale and zero for each group of ``GROUP`` weights of a row
    (the group's minimum is code 0, its maximum code 15, as llama.cpp's Q4_1).

    Half the bytes of int8, and decoding reads every weight once. On a CPU with AVX2 it multiplies in integers
    (:mod:`fournil.kernels`): 8 rows of SmolLM2's 30 layers took 5.9-7.7 ms with VNNI on 2 cores, against 12.4
    with PyTorch's int4 kernel (the one torchao's int4 CPU layout calls), which the layer uses elsewhere: it reads
    the packed codes directly and computes in fp32.
    """

    def __init__(self, *parts: nn.Linear):
        super().__init__(parts)
        self.kernel = kernels.instructions()
        if self.kernel:
            self.register_buffer("weight", kernels.quantized([p.weight for p in parts], 4)[0])
        else:  # PyTorch's kernel wants whole groups of inputs and outputs in sixteens: a narrow model's padded, zeros
            self.pad = -self.in_features % GROUP
            codes, scale, zero = int4_codes(padded(joined(parts), GROUP, 16))
            self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(codes.int(), 8))
            scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self.register_buffer("scale_zero", scale_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            y = kernels.linear(x, self.weight, self.out_features, vnni=self.kernel == 2)
        else:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            flat = F.pad(flat, (0, self.pad)) if self.pad else flat
            y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scale_zero)[:, : self.out_features]
            y = y.reshape(*x.shape[:-1], self.out_features)
        return self.finish(y, x)


def joined(parts: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The weights of ``parts`` in fp32, their rows one after the other (a copy only for several)."""
    weights = [p.weight.detach().float() for p in parts]
    return torch.cat(weights) if len(weights) > 1 else weights[0]


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (fp32) as int8 codes (-127 to 127, in fp32) and a scale per row (its largest |w| / 127, rounded to
    bf16, in fp32): w = code * scale. (``products.cpp``'s ``int_quantize`` computes the same, in one pass.)"""
    # (w.abs().amax(1) takes 5 times as long: the largest and smallest are read without a copy of the weights)
    scale = (torch.maximum(w.amax(1), -w.amin(1)).clamp(min=1e-8) / 127).to(torch.bfloat16).float()
    return (w / scale[:, None]).round_().clamp_(-127, 127), scale  # (the bf16 scale may be a little below |w|max/127)


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (fp32, whole groups of ``GROUP`` inputs) as 4-bit codes (uint8), and a scale and zero per group
    (rounded to bf16, in fp32): w = (code - 8) * scale + zero, the group's smallest code 0, its largest 15. The codes
    are chosen for the rounded scale and zero, not before their rounding (which cost 3 % of SmolLM2's perplexity).
    (``products.cpp``'s ``int_quantize`` computes the same, in one pass.)"""
    groups = w.view(w.shape[0], -1, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    codes = (groups - zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
    return codes.to(torch.uint8).view(w.shape), scale, zero


def padded(w: torch.Tensor, columns: int, rows: int) -> torch.Tensor:
    """``w`` with zero columns and rows added up to multiples of ``columns`` and ``rows``, as PyTorch's int4 kernel
    wants them (a narrow model's layers); not a copy where none are needed."""
    pad = (0, -w.shape[1] % columns, 0, -w.shape[0] % rows)
    return F.pad(w, pad) if any(pad) else w


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """``model`` with its weights in ``precision`` (in place; int8 and int4 keep the activations in bf16, the
    products that read the same input fused where a model can); tied output weights are untied first, so the
    embeddings keep their precision and the output layer gets the new one."""
    if precision not in PRECISIONS:
        raise FournilError(f"unknown weight precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model.float()
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if not hasattr(model, "new_cache"):
        raise FournilError(f"{precision} weights are for Transformers (gpt, llama, seq2seq); the {model.family} model "
                           f"is small enough")
    if precision == "int4" and model.device.type != "cpu":
        raise FournilError("int4 weights are for decoding on a CPU; on a GPU use --dtype bfloat16 or int8")
    quantize_layers(model, precision)
    return model.to(torch.bfloat16)  # the rest (embeddings, norms, scales) in bf16, the kernel's activation type


def quantize_layers(module: nn.Module, precision: str) -> None:
    """``module``'s linear layers in ``precision`` (int8 or int4), those that read the same input fused first: a
    whole model's, or one block's as soon as it has loaded (:meth:`fournil.runs.Run.load`), so that a quantized
    file's weights are never all in fp32 at once. Layers already quantized stay as they are."""
    for m in list(module.modules()):
        if hasattr(m, "fuse"):
            m.fuse(Int4Linear if precision == "int4" else Int8Linear)
    embedded = {m.weight.data_ptr() for m in module.modules() if isinstance(m, nn.Embedding)}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                # int4's output layer is int8: in 4 bits it cost SmolLM2 3.7 % of perplexity, in 8 bits nothing
                kind = Int4Linear if precision == "int4" and name != "lm_head" else Int8Linear
                setattr(parent, name, kind(child))
                getattr(parent, name).tied = child.weight.data_ptr() in embedded  # a copy of the embeddings
                getattr(parent, name).scores = name == "lm_head"


def weight_bytes(model: nn.Module) -> int:
    """Memory the weights take, each counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = {b.data_ptr(): b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear)
               for b in m.buffers()}
    return sum(seen.values()) + sum(buffers.values())
