"""A compiled decoding step: the one-token forward pass of a Transformer, compiled once by ``torch.compile``.

In eager PyTorch a decoding step of SmolLM2 runs about 25 small operations per layer, 30 layers, each paying
Python's and the dispatcher's overhead; on a CPU that is as long as reading the weights. Compiled, the small
operations fuse into a few loops per layer (Inductor's C++ backend on CPUs), and the step reads its key/value cache
through a :class:`~fournil.generate.cache.Fixed` view: every slot under a mask, the new token written in place, so
the shapes are the same at every step and the code compiles once (once for one row, once for any other number of
rows and cache size). On a CPU the compiled step itself is kept on disk, keyed by all it was compiled from, so that a
second launch loads it in seconds instead of tracing the model again (:func:`saved_steps`); elsewhere Inductor keeps
the code it generated, and a second launch traces the model again but compiles nothing. On a GPU the step can also be
replayed as a CUDA graph: its hundreds of kernels launched at once, not each from Python (not yet the default: no GPU
has run it; ``benchmarks/gpu_check.sh`` measures it).

``compile_decoding(model)`` compiles and warms up the step; from then on every scheduler that generates with that
model decodes with it (``fournil generate``, ``chat``, ``serve`` with ``--compile``).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch

import fournil
from fournil.device import autocast, prepare_compile
from fournil.errors import FournilError
from fournil.generate.cache import Fixed

_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_step(model):
    """The compiled step of ``model`` (``step(tokens, fixed_view) -> (scores, norms)``: the last token's scores in
    fp32 and each row's log-sum-exp of them, computed in the step's own parallel loops), or None."""
    return _steps.get(model)


WARMUP_COLUMNS = 47  # a cache size no dimension of a model has, so that it compiles as a size of its own


def vary(view: Fixed, tokens: torch.Tensor) -> None:
    """Compile for any cache size and (beyond one) any number of rows: those dimensions become symbols."""
    for t in (*view.k, *view.v):
        torch._dynamo.mark_dynamic(t, 2)
    torch._dynamo.mark_dynamic(view.mask, 3)
    if view.rows > 1:
        for t in (*view.k, *view.v, view.mask, view.positions, tokens):
            torch._dynamo.mark_dynamic(t, 0)


def replayed(compiled):
    """``compiled`` (Inductor's, with CUDA graphs) as a decoding step: each call replays the graph recorded for its
    number of rows and cache size (Inductor's CUDA graph trees record one the first time they meet it). A graph reads
    and writes the memory it was recorded on: the cache's keys and values, which the step writes in place, are marked
    as staying where they are (a new cache's are recorded anew), and the scores it returns are copied out before the
    next step, which begins a new round, overwrites them."""
    def replay(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (*view.k, *view.v):  # (not guarded: another cache's tensors do not compile the step again)
            torch._dynamo.mark_static_address(t, guard=False)
        torch.compiler.cudagraph_mark_step_begin()
        scores, norms = compiled(tokens, view)
        return scores.clone(), norms.clone()

    return replay


def step(model, tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding step, as it is compiled: the last token's scores in fp32, and their log-sum-exp."""
    scores = model(tokens, view)[:, -1].float()
    return scores, scores.logsumexp(-1)


def options(model, graphs: bool = False) -> dict:
    """Inductor's settings for the step (each one measured, below)."""
    return {
        # the model's modules are not checked again at every step (a millisecond for 30 layers): their code is fixed
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # on a CPU, the step's kernels called from C++, not Python: SmolLM2 in int4 decoded 98 tokens/s instead of 91,
        # for a longer first compilation (a second launch: 21 s). Not on a GPU, where it was tried once: an H200's step
        # had not compiled after 5 minutes
        "cpp_wrapper": model.device.type == "cpu",
        # its C++ built apart from the kernels' (the wrapper with fewer optimizations): SmolLM2's first compilation for
        # one row 47 s instead of 101 in int4 and 54 s instead of 128 in int8, decoding as fast (int8, 8 alternated
        # rounds in one process: 105 tokens/s against 104 for one row, 529 against 548 for 8, within the noise)
        "cpp_wrapper_build_separate": model.device.type == "cpu",
        # a loop's iterations are shared between threads only if each gets 4,096 (Inductor's default: 512): the norms,
        # activations and rotary positions of a few rows cost less than sharing them out (SmolLM2 in int4, 8 rows
        # compiled with each setting in one process, alternated: 943 tokens/s against 921, faster in 8 pairs of 8)
        "cpp.min_chunk_size": 4096,
        "triton.cudagraphs": graphs}


def compile_decoding(model, dtype: torch.dtype, max_batch: int = 1, graphs: bool = False) -> float:
    """Compile ``model``'s decoding step and run it once for one row and, if schedulers of ``max_batch`` rows can
    have more, for several (they compile separately), so that no answer waits for it. Returns the seconds it took.
    Call it once the weights are in their final precision: the compiled code reads them as they are then.
    ``graphs``: on a GPU, replay the step as CUDA graphs (on a CPU, Inductor runs it as it is)."""
    if not hasattr(model, "new_cache"):
        raise FournilError(f"--compile compiles a Transformer's decoding step; the {model.family} model has none")
    prepare_compile(model.device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model.device, dtype):
            # (kept on disk only with Inductor's caches, which TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 turns off)
            if model.device.type == "cpu" and not graphs and not torch._inductor.config.force_disable_caches:
                _steps[model] = kept(model, dtype, max_batch)
            else:
                _steps[model] = traced(model, dtype, max_batch, graphs)
    finally:
        model.train(was_training)
    return time.perf_counter() - start


def traced(model, dtype: torch.dtype, max_batch: int, graphs: bool):
    """The step compiled by ``torch.compile`` in this process, and run once (for several rows too, if
    ``max_batch``): a scheduler's call with other shapes compiles it again."""
    def this_model(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        return step(model, tokens, view)

    # a code object of its own: Dynamo keeps compiled code per code object, and without guards on the modules
    # it would take another model's compiled step for this one's whenever their tensors had the same shapes
    this_model.__code__ = this_model.__code__.replace()
    compiled = torch.compile(this_model, fullgraph=True, options=options(model, graphs))
    compiled = replayed(compiled) if graphs else compiled
    for rows in (1, 2) if max_batch > 1 else (1,):
        cache = model.new_cache(rows, WARMUP_COLUMNS, dtype)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        for n in range(2):  # (the second step, at another column, runs what the first compiled)
            view = Fixed(cache, rows)
            if n == 0:
                vary(view, tokens)
            compiled(tokens, view)
            cache.length += 1
    return compiled


def kept(model, dtype: torch.dtype, max_batch: int):
    """The step for one row and (with ``max_batch`` above 1) for several, each loaded from disk if an earlier launch
    compiled it from the same model, code and machine (:func:`saved_steps`), else compiled ahead of time and saved:
    SmolLM2's two steps in int4 loaded in 2.2-2.3 s instead of 17-18 s for tracing them again (machine A). A compiled
    function ahead of time has no guards: a call of other rows or another precision runs the model as it is."""
    compiled, name = {}, None
    for rows in (1, 2) if max_batch > 1 else (1,):
        cache = model.new_cache(rows, WARMUP_COLUMNS, dtype)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        name = name or saved_steps(model, dtype, cache.kernel)  # (the kernel: the same for any rows)
        path = Path(f"{name}-{'rows' if rows > 1 else 'row'}.bin")
        fn = load(path)
        if fn is None:
            view = Fixed(cache, rows)
            vary(view, tokens)
            # no guards: those on the model's classes cannot be saved, and the file's name says what it is for
            fn = torch.compile(step, fullgraph=True, options={
                **options(model), "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}).aot_compile(
                ((model, tokens, view), {}))
            save(fn, path)
        fn(model, tokens, Fixed(cache, rows))  # (its first call loads the code)
        compiled[rows > 1, dtype] = fn

    def dispatched(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        return compiled.get((view.rows > 1, view.k[0].dtype), step)(model, tokens, view)

    return dispatched


def saved_steps(model, dtype: torch.dtype, kernel: int) -> str:
    """Where the steps of ``model`` (for one row, for several) are kept, but for their last word: in Inductor's folder
    (fournil's, one per PyTorch and CPU kind), named by a hash of what their code depends on beyond the values of its
    inputs: fournil's own source, PyTorch's and Python's versions, the CPU's instructions, the variables of the
    environment that choose kernels, the precision and attention kernel, and the model's modules (types, settings, and
    each tensor's shape, strides and type; not the weights' values, which the step reads at every call)."""
    h = hashlib.sha256()
    package = Path(fournil.__file__).parent
    for f in sorted(package.rglob("*")):
        if f.suffix in (".py", ".cpp", ".h"):
            h.update(f.relative_to(package).as_posix().encode() + f.read_bytes())
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(("FOURNIL_", "ATEN_", "ONEDNN_")))
    h.update(repr((torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                   environment, str(dtype), kernel, repr(getattr(model, "config", None)))).encode())
    simple = (bool, int, float, str, tuple, list, torch.dtype)
    for name, m in model.named_modules():
        settings = sorted((k, v) for k, v in vars(m).items() if isinstance(v, simple))
        tensors = [(k, tuple(t.shape), t.stride(), str(t.dtype))
                   for k, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))]
        h.update(repr((name, type(m).__module__, type(m).__qualname__, settings, tensors)).encode())
    return str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "fournil-steps" / h.hexdigest()[:32])


def load(path: Path):
    """The step saved at ``path``, or None: none there, one this user did not write alone (it is a pickle, as
    Inductor's own cache is), or one this PyTorch cannot read."""
    try:
        info = path.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):  # (not on Windows)
            return None
        with open(path, "rb") as f:
            return torch.compiler.load_compiled_function(f)
    except Exception:  # noqa: BLE001 - a missing or unreadable file is compiled again, and replaced
        return None


def save(fn, path: Path) -> None:
    """Write the step at ``path`` whole or not at all (a killed launch leaves no half file to load)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")
        fn.save_compiled_function(str(part))
        os.chmod(part, 0o600)
        os.replace(part, path)
    except OSError as e:
        warnings.warn(f"the compiled decoding step could not be kept for the next launch ({e}); it works for this "
                      f"one", stacklevel=2)
