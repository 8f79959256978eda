"""fournil's C++ kernels for CPUs: quantized products and one new token's attention for decoding (AVX2, or
AVX512), and dropout for training (any x86 CPU).

``products.cpp``: quantized weights by int8 activations in integers. PyTorch's int4 and int8 CPU kernels multiply in
fp32 or bf16; with the 8 rows of a batch decoding, that arithmetic, not reading the weights, sets their speed. The
kernel quantizes each row's activations to int8 in groups of 32 inputs and multiplies in integers, four products per
fp32 one with VNNI, two with AVX2 (llama.cpp multiplies its blocks the same way). Its results do not depend on the
other rows: each row is quantized on its own, its sums taken in the same order.

``attention.cpp`` (its algorithm in ``attention.h``): a decoding step's attention (one new token per row) over a bf16
or fp32 key/value cache, read once, computed in fp32 (:attr:`fournil.generate.cache.KVCache.kernel` says when a
cache's is, and with which instructions).

``vectors.h``: the vector pieces both share (bf16 widened to fp32, a vector's largest and smallest lane).

``dropout.cpp``: dropout whose draws are a hash of a seed and each element's index (:class:`fournil.models.base.
Dropout`).

They are built by PyTorch's extension builder with the machine's compiler the first time they are needed (10-30
seconds, said on stderr), and kept on disk for the next launches. Where they cannot be built (no compiler, not an
x86 CPU), :func:`built` is False; :func:`instructions` says which of them run on this CPU. PyTorch's operations
stand in for the others.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from fournil.device import cache_folder

SOURCES = [str(Path(__file__).with_name(name)) for name in ("products.cpp", "attention.cpp", "dropout.cpp")]
HEADERS = [str(Path(__file__).with_name(name)) for name in ("attention.h", "vectors.h")]
LANES = 16  # output rows per block: one per int32 lane of a 512-bit register
GROUP = 32  # inputs per activation scale, and per int4 weight scale and zero


@functools.cache
def built() -> bool:
    """Whether fournil's kernels are built here, or loaded from the disk cache (on first call); on x86 CPUs only."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    path = library()
    if not loaded(path) and not build(path.parent):
        return False
    torch.library.register_fake("fournil::int_linear")(
        lambda x, weights, scales, vnni: x.new_empty(x.shape[0], weights.shape[0] * LANES))
    torch.library.register_fake("fournil::decode_attention")(attention_shape)
    return True


def library() -> Path:
    """Where the kernels are built: one folder per torch version and per version of the sources, so that every
    install of the same sources loads the same library directly, without PyTorch's builder (importing it took 0.1 s
    of every launch; and it takes sources at another path for changed sources: two installs sharing a folder rebuilt
    it in turn)."""
    sources = hashlib.sha256(b"".join(Path(path).read_bytes() for path in SOURCES + HEADERS)).hexdigest()[:8]
    return cache_folder("kernels") / f"torch-{torch.__version__}-{sources}" / "fournil_kernels.so"


def loaded(path: Path) -> bool:
    """Whether the library at ``path`` loaded (it may not be there, or be a build stopped halfway)."""
    try:
        torch.ops.load_library(str(path))
    except OSError:
        return False
    return True


def build(folder: Path) -> bool:
    """Build the kernels in ``folder`` and load them; False, with a warning, where no compiler can."""
    import ninja  # the build tool PyTorch's builder runs, from PyPI: on PATH even where the venv is not activated
    from torch.utils import cpp_extension

    if not shutil.which("ninja"):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    folder.mkdir(parents=True, exist_ok=True)
    # (said, or a first training step, or answer, seems to hang)
    print("fournil: building its C++ kernels, once for this machine (10-30 s)", file=sys.stderr, flush=True)
    # built with OpenMP, or ``at::parallel_for`` runs on one core: SmolLM2 in int4, compiled, decoded 88-116 tokens/s
    # on 2 cores that way against 169-191 on both. The OpenMP library is the one PyTorch loaded, so its threads are
    # PyTorch's. A compiler without OpenMP still builds the kernels, for one core.
    for flags in (["-fopenmp"], []):
        try:
            cpp_extension.load("fournil_kernels", SOURCES, extra_cflags=["-O3", *flags], extra_ldflags=flags,
                               build_directory=str(folder), is_python_module=False)
            return True
        except Exception:  # noqa: BLE001 - no compiler (or none with OpenMP): without OpenMP, then PyTorch's kernels
            continue
    compiler = os.environ.get("CXX", "c++")
    warnings.warn(f"int8 and int4 layers, decoding's attention and dropout use PyTorch's kernels, slower: fournil's "
                  f"kernels could not be built with {compiler!r}; install a C++ compiler (g++) to build them",
                  stacklevel=3)
    return False


@functools.cache
def instructions() -> int:
    """What the kernels compute with here: 2, AVX512-VNNI (and AVX512); 1, AVX2; 0, nothing (not built, or a CPU
    without AVX2). No more than PyTorch's own kernels use: ATEN_CPU_CAPABILITY=avx2 makes a CPU with AVX512 compute
    as an older one does, fournil's kernels included."""
    level = {"AVX512": 2, "AVX2": 1}.get(torch.backends.cpu.get_cpu_capability(), 0)
    return min(level, torch.ops.fournil.instructions()) if level and built() else 0



def attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    avx512: bool) -> torch.Tensor:
    """What ``decode_attention`` returns, for compiling it; and that its keys, values and mask have as many slots:
    told so, the compiler passes every layer's cache size as one number, not as 60, each made a tensor at every step
    (SmolLM2's compiled int4 step for one row: 5.1-5.9 ms against 6.5-6.9)."""
    torch._check(k.shape[2] == v.shape[2])
    if mask is not None:
        torch._check(mask.shape[-1] == k.shape[2])
    return q.new_empty(q.shape)


def attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> int:
    """With which instructions ``decode_attention`` reads a key/value cache on ``device`` of ``dtype`` and
    ``head_dim``, as :func:`instructions` says them (2: AVX512's); 0 where it does not."""
    fits = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and head_dim % 16 == 0 and head_dim <= 128
    return instructions() if fits else 0


def quantized(weights: list[torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of ``weights`` (each out_i x in), one after the other, quantized to ``bits`` as
    :mod:`fournil.generate.quantize` does it, laid out for :func:`linear` (``products.cpp`` says how): out/16 blocks of
    in/32 groups (rounded up: the rows and inputs added are zeros), a 4-bit group holding its 16 rows' bf16 scales and
    zeros; 8-bit, with one bf16 scale per padded row."""
    packed = torch.ops.fournil.int_quantize([w.detach().float().contiguous() for w in weights], bits)
    return packed[0], packed[1] if bits == 8 else None


def linear(x: torch.Tensor, weights: torch.Tensor, out_features: int, scales: torch.Tensor | None = None,
           vnni: bool = False) -> torch.Tensor:
    """``x`` (..., in, padded to the weights' inputs) by ``weights`` of :func:`quantized` (8-bit: and ``scales``, one
    bf16 per padded output row): (..., out_features) in fp32, with VNNI's instructions or AVX2's (:func:`instructions`
    says which run here; a layer asks once, as it is made, not in a compiled step)."""
    flat = x.reshape(-1, x.shape[-1])
    inputs = weights.shape[1] * GROUP
    flat = torch.nn.functional.pad(flat, (0, inputs - flat.shape[1])) if flat.shape[1] < inputs else flat
    y = torch.ops.fournil.int_linear(flat.float().contiguous(), weights, scales, vnni)
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)
