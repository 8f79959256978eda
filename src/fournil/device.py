"""Device and precision are chosen here and nowhere else, and where code compiled for this CPU is kept.

The precision policy: what *computes* (training steps, generation on a GPU) runs in bf16 where the hardware multiplies
it fast (recent GPUs; on CPUs with AMX or AVX512-BF16 units, models wide enough for their products to pay), fp16 on
older GPUs, fp32 otherwise. Generation on a CPU computes in its weights' precision, fp32 unless ``--dtype`` stores them
in less: under autocast, every fp32 weight was cast to bf16 at every token, which made SmolLM2 decode 2.5 times slower
on an AMX CPU and rounded its scores to bf16's steps, where near ties went to the lower token id. Weights cast to bf16
once (``--dtype bfloat16``) are faster there for batches and long prompts. A quantized GGUF file's weights stay in their
bits for generation on a CPU (int4 or int8, :func:`generation_weights`): fewer bytes to read per token, and little lost
beyond what the file gave up. What *measures* (NLL and perplexity in ``eval`` and validation, ``explain``, ``score``,
reward scores, and the server's prompt log-probabilities from fp32 weights) runs in fp32, so that a model gets the same
figure, to fp32 rounding, on every CPU. ``--dtype`` overrides both. ``FOURNIL_CPU_BF16=1`` makes a CPU compute in bf16
whatever the model's width (to test that path anywhere), ``=0`` never.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from pathlib import Path

import torch

from fournil.errors import FournilError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16 = "FOURNIL_CPU_BF16"  # 1: compute in bf16 on this CPU; 0: never; unset: where a measurement says it pays


def pick_device(name: str = "auto") -> torch.device:
    """The fastest device present (CUDA, then Apple MPS, then CPU), or the one asked for; on CUDA, with cuDNN's
    attention off.

    cuDNN's attention, PyTorch's first choice on Hopper and Blackwell GPUs since cuDNN 9.15, builds a graph for each
    shape it is given and keeps every one, in the process's memory, for the life of the thread that ran it. fournil's
    shapes vary: a key/value cache one column longer at every generated token, prompts and padded batches of every
    length. On an H200 a server under 8 clients grew by 600 MiB of resident memory a minute, minute after minute (4
    minutes). Flash and memory-efficient attention take any length as it comes."""
    device = _device(name)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def _device(name: str) -> torch.device:
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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 512, repeat: int = 10,
                clock=time.perf_counter) -> float:
    """Measured dense matrix-product speed in FLOP/s (the best of three rounds, timed by ``clock``): the peak MFU is
    reported against. Its matrices come from a generator of their own: a resumed run measures after restoring
    PyTorch's, and drawing from that would change the dropout masks of the steps it goes on with."""
    numbers = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=numbers).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(repeat):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return 2 * n**3 * repeat / best


@functools.cache
def cpu_bf16_pays(width: int) -> bool:
    """Whether this CPU multiplies bf16 matrices of a model ``width`` wide clearly faster than fp32 (AMX or AVX512-BF16
    units, and matrices large enough for them).

    Measured rather than guessed: without those units bf16 is emulated and can be 40 times slower; with them, narrow
    products are no faster, and the rest of a training step (casts, attention's backward pass) slower. On a 2-core Xeon
    with AMX, bf16 products of 256 x 256 ran 1.9 to 3.4 times as fast as fp32's, of 128 x 128 0.7 to 1.3 times, of 64 x
    64 0.2 times, and the default gpt (64 wide) trained at half its fp32 speed in bf16; SmolLM2's distillation (576
    wide) at 2.5 times its fp32 speed. So the products are measured at the model's width (512 at most: wider pays more).
    The environment variable ``FOURNIL_CPU_BF16`` (1 or 0) decides instead, whatever the width.
    """
    forced = os.environ.get(CPU_BF16, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise FournilError(f"{CPU_BF16}={forced!r}: set it to 1 (compute in bf16 on this CPU), 0 (never), or unset it")
        return forced == "1"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    cpu, n = torch.device("cpu"), min(width, 512)
    repeat = min(100, max(10, 2**24 // n**3))  # (narrow products are quick: more of them, to time more than the clock)
    # on one thread, timed by the time it computed: what a core's units do, not what other processes leave of it. By
    # the wall clock, one thread beside three processes computing, 2 decisions in 60 came out fp32 for SmolLM2 (2-core
    # AVX512-BF16): the same command trained in another precision, a resumed run too. This way none of 60 did.
    clock = time.thread_time if time.get_clock_info("thread_time").resolution <= 1e-6 else time.perf_counter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # in turns, the best of each: a busy moment slows both, not one
        turns = [(matmul_rate(cpu, torch.bfloat16, n, repeat, clock), matmul_rate(cpu, torch.float32, n, repeat, clock))
                 for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    return max(bf16 for bf16, _ in turns) > 1.5 * max(fp32 for _, fp32 in turns)


def pick_dtype(device: torch.device, name: str = "auto", measure: bool = False,
               width: int | None = None) -> torch.dtype:
    """The precision ``name`` asks for; for ``auto``, fp32 for a measurement, else bf16 where the hardware runs it
    fast (recent GPUs; CPUs with bf16 matrix units, for a model ``width`` wide: :func:`cpu_bf16_pays`), fp16 on older
    GPUs (training then scales the loss), fp32 otherwise."""
    if name != "auto":
        if name not in DTYPES:
            raise FournilError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if measure:
        return torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and later: fp32 products in TF32 where fp32 remains
        torch.backends.cudnn.allow_tf32 = True
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and width and cpu_bf16_pays(width):
        return torch.bfloat16
    return torch.float32


def model_width(model) -> int | None:
    """A model's width (its embeddings' size: a reward model's, its language model's), which decides whether bf16
    pays on a CPU; None for a count table."""
    return next((m.config.n_embd for m in model.modules() if hasattr(getattr(m, "config", None), "n_embd")), None)


def generation_weights(device: torch.device, bits: int | None) -> str | None:
    """The precision ``--dtype auto`` stores a model's weights in for generation, given the ``bits`` its file stores
    most of them in (None: floats, or weights trained here): on a CPU, a quantized file's own, int4 for 4 bits or
    fewer and int8 for more; else None, the weights as loaded. Decoding reads every weight once per token, so on a
    CPU fewer bytes decode faster: SmolLM2's Q4_1 file decodes 2.5 to 4.5 times as fast in int4 as in fp32, with a
    perplexity within 0.3 % of fp32's. A GPU computes in bf16 instead (int4 is for CPUs)."""
    if device.type != "cpu" or bits is None:
        return None
    return "int4" if bits <= 4 else "int8"  # (GGUF's quantized types have 1 to 8 bits)


def generation_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """What generation computes in: on a CPU, the weights' precision (fp32 as loaded) unless asked; see the policy."""
    return torch.float32 if device.type == "cpu" and name == "auto" else pick_dtype(device, name)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_budget(device: torch.device) -> int:
    """Bytes a batch may take for what grows with it (a training batch's layer activations, a generation batch's
    key/value cache): 1 GiB on a CPU, whose memory a laptop shares with everything else, and a quarter of what is free
    on a GPU (on an H200, LoRA fine-tuning of SmolLM2 ran at 66 tokens/s recomputing its layers in passes of 2 rows)."""
    return torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 2**30


def activation_budget(device: torch.device) -> int:
    """Bytes a training batch's layer activations may take before its layers are recomputed (``--low-memory auto``):
    an eighth of a CPU's memory, at least :func:`memory_budget` (elsewhere, that). A generation batch gains little
    from more memory on a CPU; a training step does: recomputing made SmolLM2's LoRA steps on gsm8k_train 1.4 times
    slower (97 answer tokens/s against 137, 2-core AVX512-BF16), for a peak of 2.4 GiB resident against 4.2."""
    floor = memory_budget(device)
    return max(floor, (memory_size(device) or 0) // 8) if device.type == "cpu" else floor


def memory_size(device: torch.device) -> int | None:
    """The bytes of memory a device has in all (None where unknown): no run can go beyond it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (AttributeError, ValueError, OSError):  # (Windows has no sysconf)
        return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_text(device: torch.device, compute: torch.dtype, measure: torch.dtype) -> str:
    """``cpu bfloat16, scores float32``: where and in what precision a command computes and measures, as it says."""
    scores = "" if measure == compute else f", scores {dtype_name(measure)}"
    return f"{device.type} {dtype_name(compute)}{scores}"


def cache_folder(name: str) -> Path:
    """Where fournil keeps code it compiled (``~/.cache/fournil/NAME``): it outlives a reboot, unlike /tmp."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fournil" / name


def prepare_compile(device: torch.device) -> None:
    """What ``torch.compile`` needs before it traces a model for ``device``: a folder for its code
    (:func:`inductor_folder`), and on a CPU, Inductor's check of the vector instructions already under way.

    The check: at every launch, Inductor builds and loads small test libraries, each in a child Python, to learn
    which vector instructions its compiler can use (1.3 s on machine C). Started now in a thread of its own, it
    waits for them while Dynamo traces the model in this one: a restart compiled SmolLM2's decoding step in 5.6-5.8 s
    instead of 6.3-6.5 (three launches each, alternated).
    """
    inductor_folder()
    if device.type == "cpu":
        threading.Thread(target=check_vector_instructions, name="fournil-isa-check", daemon=True).start()


def inductor_folder() -> Path:
    """The folder where Inductor keeps the code it compiles, set for this process: fournil's, one per PyTorch and CPU
    kind, unless the user chose another. Inductor's default folder, under /tmp, is lost at a reboot, and its keys do
    not tell CPU kinds apart: code compiled with AVX512 then read under ``ATEN_CPU_CAPABILITY=avx2`` (or from a home
    folder shared by machines whose CPUs differ) gave NaN scores, or corrupted the heap. PyTorch writes its default
    into the environment the first time anything reads its cache (transformers' GGUF loader does): that value is
    replaced too. (Asking Inductor for its default imports Dynamo, 1.1 s: only done where a folder is set.)"""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or chosen == inductor_default():
        kind = f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_folder("inductor") / kind)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def inductor_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def check_vector_instructions() -> None:
    """Inductor's choice of vector instructions, which it keeps for the compilations to come in this process."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    with contextlib.suppress(Exception):  # (a failure shows again, where Inductor itself asks)
        pick_vec_isa()
