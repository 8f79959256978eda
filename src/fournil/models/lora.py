"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, ``W x + (alpha / r) B A x``.

A few per cent of the parameters train, so the optimizer's state and the gradients shrink with them. The layer keeps
the frozen weight under its own name (``q_proj.weight``) and adds ``q_proj.lora_A.weight`` and ``q_proj.lora_B.weight``,
the names PEFT gives them, so adapters go to and from PEFT by a prefix.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fournil.config import LoraConfig
from fournil.errors import FournilError
from fournil.models.base import Dropout


class LoRALinear(nn.Linear):
    def __init__(self, linear: nn.Linear, config: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight
        self.lora_A = nn.Linear(self.in_features, config.rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(config.rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts as the base model
        self.lora_dropout = Dropout(config.dropout)
        self.scaling = config.scaling
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        low = self.lora_A(self.lora_dropout(x)).flatten(0, -2)  # (positions, rank)
        # out + scaling x B(low) in one product, without the update and the sum as tensors of out's size: SmolLM2's
        # up_proj on 8 rows of 120 tokens in bf16, forward and backward, took 4.4 ms so, 5.9 with them (2.8 unadapted)
        return torch.addmm(out.flatten(0, -2), low, self.lora_B.weight.t(), alpha=self.scaling).view(out.shape)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """``W + scaling B A``, in fp32: the weight of one layer that computes what this one does."""
        return torch.addmm(self.weight.float(), self.lora_B.weight.float(), self.lora_A.weight.float(),
                           alpha=self.scaling)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.folded())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model's computation, every LoRA update left out: a reference model that costs no memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def linear_names(model: nn.Module) -> list[str]:
    """The short names of the model's linear layers that LoRA may adapt (the output layer is left out)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name != "lm_head"})


def add_lora(model: nn.Module, config: LoraConfig) -> int:
    """Freeze ``model`` and put LoRA on its target layers (in place); returns the number of trainable parameters."""
    config.check()
    known = linear_names(model)
    if not known:  # (nothing would train)
        raise FournilError(f"LoRA adapts linear layers, and this {model.family} model has none but its output layer: "
                           f"tune every weight (leave --lora out)")
    targets = set(config.targets or known)
    if unknown := sorted(targets - set(known)):
        raise FournilError(f"no linear layer named {', '.join(unknown)} in this {model.family} model; "
                           f"its layers: {', '.join(known)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in targets and child is not getattr(model, "lm_head", None):
                setattr(parent, name, LoRALinear(child, config))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight (in place): a plain model again, as fast as the base."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
