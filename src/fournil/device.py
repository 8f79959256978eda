"""Device and precision are chosen here and nowhere else."""
from __future__ import annotations

import contextlib

import torch

from fournil.errors import FournilError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """The fastest device present (CUDA, then Apple MPS, then CPU), or the one asked for."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FournilError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FournilError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FournilError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The compute precision: bf16 on GPUs that have it, else fp16 on older GPUs, fp32 on CPU.

    CPUs without native bf16 matrix units run bf16 autocast slower than fp32, so CPU stays fp32 by default.
    """
    if name != "auto":
        if name not in DTYPES:
            raise FournilError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
