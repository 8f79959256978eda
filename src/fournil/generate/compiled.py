"""A compiled decoding step: the one-token forward pass of a Transformer, compiled once by ``torch.compile``.

In eager PyTorch a decoding step of SmolLM2 runs about 25 small operations per layer, 30 layers, each paying
Python's and the dispatcher's overhead; on a CPU that is as long as reading the weights. Compiled, the small
operations fuse into a few loops per layer (Inductor's C++ backend on CPUs), and the step reads its key/value cache
through a :class:`~fournil.generate.cache.Fixed` view: every slot under a mask, the new token written in place, so
the shapes are the same at every step and the code compiles once (once for one row, once for any other number of
rows and cache size). Inductor keeps what it compiled on disk, so a second launch compiles in seconds. On a GPU the
step can also be replayed as a CUDA graph: its hundreds of kernels launched at once, not each from Python (not yet
the default: no GPU has run it; ``benchmarks/gpu_check.sh`` measures it).

``compile_decoding(model)`` compiles and warms up the step; from then on every scheduler that generates with that
model decodes with it (``fournil generate``, ``chat``, ``serve`` with ``--compile``).
"""
from __future__ import annotations

import time
import weakref

import torch

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
    def step(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (*view.k, *view.v):  # (not guarded: another cache's tensors do not compile the step again)
            torch._dynamo.mark_static_address(t, guard=False)
        torch.compiler.cudagraph_mark_step_begin()
        scores, norms = compiled(tokens, view)
        return scores.clone(), norms.clone()

    return step


def compile_decoding(model, dtype: torch.dtype, max_batch: int = 1, graphs: bool = False) -> float:
    """Compile ``model``'s decoding step and run it once for one row and, if schedulers of ``max_batch`` rows can
    have more, for several (they compile separately), so that no answer waits for it. Returns the seconds it took.
    Call it once the weights are in their final precision: the compiled code reads them as they are then.
    ``graphs``: on a GPU, replay the step as CUDA graphs (on a CPU, Inductor runs it as it is)."""
    if not hasattr(model, "new_cache"):
        raise FournilError(f"--compile compiles a Transformer's decoding step; the {model.family} model has none")

    def step(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        scores = model(tokens, view)[:, -1].float()
        return scores, scores.logsumexp(-1)

    # a code object of its own: Dynamo keeps compiled code per code object, and without guards on the modules
    # (below) it would take another model's compiled step for this one's whenever their tensors had the same shapes
    step.__code__ = step.__code__.replace()

    prepare_compile(model.device)
    compiled = torch.compile(step, fullgraph=True, options={
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
        "triton.cudagraphs": graphs})
    _steps[model] = replayed(compiled) if graphs else compiled
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for rows in (1, 2) if max_batch > 1 else (1,):
            cache = model.new_cache(rows, WARMUP_COLUMNS, dtype)
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
            with torch.no_grad(), autocast(model.device, dtype):
                for n in range(2):  # (the second step, at another column, runs what the first compiled)
                    view = Fixed(cache, rows)
                    if n == 0:
                        vary(view, tokens)
                    _steps[model](tokens, view)
                    cache.length += 1
    finally:
        model.train(was_training)
    return time.perf_counter() - start
