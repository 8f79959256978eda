"""A compiled decoding step: the one-token forward pass of a Transformer, compiled once by ``torch.compile``.

In eager PyTorch a decoding step of SmolLM2 runs about 25 small operations per layer, 30 layers, each paying
Python's and the dispatcher's overhead; on a CPU that is as long as reading the weights. Compiled, the small
operations fuse into a few loops per layer (Inductor's C++ backend on CPUs), and the step reads its key/value cache
through a :class:`~fournil.generate.cache.Fixed` view: every slot under a mask, the new token written in place, so
the shapes are the same at every step and the code compiles once (once for one row, once for any other number of
rows and cache size). On a CPU the compiled step itself is kept on disk, keyed by all it was compiled from, so that a
second launch loads it in seconds instead of tracing the model again (:func:`step_paths`); a chat or a server answers
meanwhile, as the model is, while a thread loads it, or the first time while another process compiles it
(:class:`Background`). Elsewhere Inductor keeps the code it generated, and a second launch traces the model again but
compiles nothing. On a GPU the step can also be replayed as a CUDA graph: its hundreds of kernels launched at once,
not each from Python (not yet the default: no GPU has run it; ``benchmarks/gpu_check.sh`` measures it).

``compile_decoding(model)`` compiles and warms up the step; from then on every scheduler that generates with that
model decodes with it (``fournil generate``, ``chat``, ``serve`` with ``--compile``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

import fournil
from fournil import kernels
from fournil.device import autocast, inductor_folder, prepare_compile
from fournil.errors import FournilError
from fournil.generate.cache import Fixed
from fournil.models.base import decoder_only

_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_step(model):
    """The compiled step of ``model`` (``step(tokens, fixed_view) -> (scores, norms)``: the last token's scores in
    fp32 and each row's log-sum-exp of them, computed in the step's own parallel loops), or None (none yet, or one
    still compiling or loading in the background: see :func:`settle`)."""
    found = _steps.get(model)
    return None if isinstance(found, Background) else found


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


def check_compilable(model) -> None:
    decoder_only(model, "--compile")
    if not hasattr(model, "new_cache"):
        raise FournilError(f"--compile compiles a Transformer's decoding step; the {model.family} model has none")


def compile_decoding(model, dtype: torch.dtype, max_batch: int = 1, graphs: bool = False,
                     background: Callable[[float, bool], None] | None = None) -> float | Background:
    """Compile ``model``'s decoding step and run it once for one row and, if schedulers of ``max_batch`` rows can
    have more, for several (they compile separately), so that no answer waits for it. Returns the seconds it took.
    Call it once the weights are in their final precision: the compiled code reads them as they are then.
    ``graphs``: on a GPU, replay the step as CUDA graphs (on a CPU, Inductor runs it as it is).

    ``background``: where the step is kept on disk (on a CPU), load it, or compile it in another process, while the
    model decodes as it is, and return at once the :class:`Background` that does it; the schedulers take the step once
    it is ready (:func:`settle`), and ``background`` is then called with the seconds it took and whether it was
    compiled (or only loaded). A chat or a server answers from the start instead of after a minute of compilation,
    or after the seconds that loading a step takes."""
    check_compilable(model)
    # (kept on disk only with Inductor's caches, which TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 turns off)
    keeping = model.device.type == "cpu" and not graphs and not torch.compiler.config.force_disable_caches
    start = time.perf_counter()
    with decoding(model, dtype):
        if keeping and background:  # (Inductor itself is imported in the other thread: 1.1 s less before answers)
            _steps[model] = Background(model, dtype, step_paths(model, dtype, max_batch), background)
            return _steps[model]
        prepare_compile(model.device)
        _steps[model] = kept(model, dtype, max_batch) if keeping else traced(model, dtype, max_batch, graphs)
    return time.perf_counter() - start


@contextlib.contextmanager
def decoding(model, dtype: torch.dtype):
    """What a decoding step runs under: the model in evaluation, no gradients, ``dtype``'s autocast."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model.device, dtype):
            yield
    finally:
        model.train(was_training)


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
    compiled it from the same model, code and machine (:func:`step_paths`), else compiled ahead of time and saved.
    SmolLM2's two steps in int4 loaded in 2.2-2.3 s instead of 17-18 s for tracing them again (machine A)."""
    paths = step_paths(model, dtype, max_batch)
    steps = {rows: load(path) for rows, path in paths.items()}
    for rows, path in paths.items():
        if steps[rows] is None:
            steps[rows] = ahead_of_time(model, dtype, rows)
            keep(steps[rows], path)
    return dispatched(model, dtype, steps)


def warmup(model, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, Fixed]:
    """A step's first tokens and view, in a cache of its own."""
    cache = model.new_cache(rows, WARMUP_COLUMNS, dtype)
    return torch.zeros(rows, 1, dtype=torch.long, device=model.device), Fixed(cache, rows)


def ahead_of_time(model, dtype: torch.dtype, rows: int):
    """The step for ``rows`` (1, or any number above), compiled ahead of time: it has no guards (those on the model's
    classes cannot be saved; the file's name says what it is for), so a call of other rows or another precision must
    not reach it."""
    tokens, view = warmup(model, dtype, rows)
    vary(view, tokens)
    return torch.compile(step, fullgraph=True, options={
        **options(model), "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}).aot_compile(
        ((model, tokens, view), {}))


def dispatched(model, dtype: torch.dtype, steps: dict):
    """The decoding step that calls each step compiled ahead of time (``steps``: by rows) for what it was compiled
    for, and the model as it is for anything else; each is called once here (its first call loads its code)."""
    compiled = {}
    for rows, fn in steps.items():
        fn(model, *warmup(model, dtype, rows))
        compiled[rows > 1, dtype] = fn

    def call(tokens: torch.Tensor, view: Fixed) -> tuple[torch.Tensor, torch.Tensor]:
        return compiled.get((view.rows > 1, view.k[0].dtype), step)(model, tokens, view)

    return call


def step_paths(model, dtype: torch.dtype, max_batch: int) -> dict[int, Path]:
    """Where the steps of ``model`` for one row and (with ``max_batch`` above 1) for several are kept: in Inductor's
    folder (fournil's, one per PyTorch and CPU kind), named by a hash of what their code depends on beyond the values of
    its inputs: fournil's own source, PyTorch's and Python's versions, the CPU's instructions, the variables of the
    environment that choose kernels, the precision and attention kernel, and the model's modules (types, settings, and
    each tensor's shape, strides and type; not the weights' values, which the step reads at every call)."""
    h = hashlib.sha256()
    package = Path(fournil.__file__).parent
    for f in sorted(package.rglob("*")):
        if f.suffix in (".py", ".cpp", ".h"):
            h.update(f.relative_to(package).as_posix().encode() + f.read_bytes())
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(("FOURNIL_", "ATEN_", "ONEDNN_")))
    h.update(repr((torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                   environment, str(dtype), model.new_cache(1, 1, dtype).kernel,
                   repr(getattr(model, "config", None)))).encode())
    simple = (bool, int, float, str, tuple, list, torch.dtype)
    for name, m in model.named_modules():
        settings = sorted((k, v) for k, v in vars(m).items() if isinstance(v, simple))
        tensors = [(k, tuple(t.shape), t.stride(), str(t.dtype))
                   for k, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))]
        h.update(repr((name, type(m).__module__, type(m).__qualname__, settings, tensors)).encode())
    name = inductor_folder() / "fournil-steps" / h.hexdigest()[:32]
    return {rows: Path(f"{name}-{'rows' if rows > 1 else 'row'}.bin") for rows in ((1, 2) if max_batch > 1 else (1,))}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part")
    fn.save_compiled_function(str(part))
    os.chmod(part, 0o600)
    os.replace(part, path)


def keep(fn, path: Path) -> None:
    """:func:`save`, or a warning: the step works for this launch all the same."""
    try:
        save(fn, path)
    except OSError as e:
        warnings.warn(f"the compiled decoding step could not be kept for the next launch ({e}); it works for this "
                      f"one", stacklevel=2)


class Background:
    """Steps on their way while the model answers as it is: a thread here loads those kept on disk (loading imports
    Dynamo and most of Inductor: 3.2 s for SmolLM2's step, machine A), and has the others compiled ahead of time by
    another Python, a child of this one, which keeps them on disk for the thread to load. Both yield the CPU to
    answers: the thread at a lower priority, the child at the lowest. The model's thread takes the steps once all are
    read (:func:`settle`). The child gets the model through a pipe as :class:`Shapes` and ends when the pipe closes:
    when this process ends, whatever the cause. Ctrl-C in a terminal does not reach it."""

    def __init__(self, model, dtype: torch.dtype, paths: dict[int, Path], ready: Callable[[float, bool], None]):
        self.model, self.dtype, self.paths, self.ready = model, dtype, paths, ready
        self.compiling = not all(path.exists() for path in paths.values())  # (what to say: a file may not load)
        self.start = time.perf_counter()
        self.shapes = io.BytesIO()  # (the model as it is now: answers may change its weights while the thread runs)
        Shapes(self.shapes, protocol=pickle.HIGHEST_PROTOCOL).dump((fournil.__file__, model, dtype))
        self.steps: dict = {}
        self.process: subprocess.Popen | None = None
        self.failure: str | None = None  # (why they could not be made)
        self.leaving = False  # (this process ends: what the other one keeps is for the next launch, not read here)
        self.log = tempfile.TemporaryFile()
        self.decided, self.read_back = threading.Event(), threading.Event()
        threading.Thread(target=self.fetch, name="fournil-compiled-step", daemon=True).start()

    def fetch(self) -> None:
        """In this thread: the steps kept on disk, then those the other process compiles (and keeps) for the rest.

        At a lower priority than answers (on Linux, where a thread has one of its own): loading SmolLM2's step at the
        usual priority made the first answer (64 tokens in int4) take 2.2-3.1 s instead of 0.9 (machine A); at nice
        10, 1.1 s. Not at the lowest: with both cores busy with other work, at ``SCHED_IDLE`` it never loaded the
        step, and the chat decoded as the model is, its answer done 69 s after the launch; at nice 10, after 11-12 s,
        as when the load came first (11-21 s)."""
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # (a sandbox may refuse it: the thread then loads all the same)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            self.steps = {rows: load(path) for rows, path in self.paths.items()}
            missing = {rows: path for rows, path in self.paths.items() if self.steps[rows] is None}
            if missing:
                self.compiling = True
                self.process = self.compile(missing)
                self.decided.set()
                if self.process.wait():
                    self.log.seek(0)
                    lines = self.log.read().decode(errors="replace").strip().splitlines()
                    self.failure = lines[-1] if lines else f"exit status {self.process.returncode}"
                elif not self.leaving:
                    self.steps.update({rows: load(path) for rows, path in missing.items()})
        except Exception as e:  # noqa: BLE001 - said in the model's thread, which answers without the step
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            self.decided.set()
            self.read_back.set()

    def compile(self, missing: dict[int, Path]) -> subprocess.Popen:
        """The other Python, compiling the steps ``missing`` (by rows) and keeping each where it is named."""
        # (in this process's session: Linux shares the CPU between sessions before it looks at priorities, and in a
        # session of its own it took half of it, decoding at a fifth of its speed meanwhile; so it ignores Ctrl-C)
        process = subprocess.Popen([sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, "
                                    "signal.SIG_IGN); from fournil.generate.compiled import child; child()"],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log)
        with contextlib.suppress(OSError):  # (a sandbox may refuse it: then it compiles at the usual priority)
            if hasattr(os, "SCHED_IDLE"):  # (Linux: it runs only on a core nothing else wants, and its compilers too)
                os.sched_setscheduler(process.pid, os.SCHED_IDLE, os.sched_param(0))
            elif hasattr(os, "setpriority"):
                os.setpriority(os.PRIO_PROCESS, process.pid, 19)
        process.stdin.write(self.shapes.getvalue())
        pickle.dump(missing, process.stdin)
        process.stdin.flush()
        return process

    def installed(self):
        """The steps read back as one decoding step, or None (with a warning saying why) if they could not be made."""
        if self.process:
            self.process.stdin.close()
        if self.said_why():
            return None
        with decoding(self.model, self.dtype):
            found = dispatched(self.model, self.dtype, self.steps)
        self.ready(time.perf_counter() - self.start, self.compiling)
        return found

    def said_why(self) -> bool:
        """Whether the steps could not be made; if so, a warning says why (the other process's last line, or what
        failed in this one's thread)."""
        if self.failure is None and None not in self.steps.values():
            return False
        why = self.failure or "the step it kept could not be read"
        warnings.warn(f"the decoding step could not be compiled in the background ({why}); answers go on without it",
                      stacklevel=3)
        return True


def settle(model) -> None:
    """If ``model``'s step was on its way in the background (:class:`Background`) and has been read, take it: the
    model decodes with it from now on. Call it in the model's thread, while its weights are its own (the step reads
    them as they were when it was compiled)."""
    found = _steps.get(model)
    if isinstance(found, Background) and found.read_back.is_set():
        _steps[model] = found.installed()
        if _steps[model] is None:
            del _steps[model]


def wait_compiling(model, waiting: Callable[[], None]) -> None:
    """Before this process ends: if ``model``'s step is still compiling in the background, call ``waiting`` and wait
    until it is kept for the next launch (Ctrl-C stops it); a compilation that failed says why. (And no thread is left
    loading a step while Python shuts down.)"""
    found = _steps.get(model)
    if not isinstance(found, Background):
        return
    found.leaving = True
    try:
        found.decided.wait()
        if found.process and found.process.poll() is None:
            waiting()
            found.process.wait()
        found.read_back.wait()
    except KeyboardInterrupt:
        if found.process:
            found.process.kill()
        return
    if found.failure:
        found.said_why()


class Shapes(pickle.Pickler):
    """A model as its structure and the shapes, strides and types of its tensors, not their values (what compiling
    its code depends on): SmolLM2 in 45 KB."""

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        storage = obj.untyped_storage()
        return (isinstance(obj, torch.nn.Parameter), obj.requires_grad, tuple(obj.shape), obj.stride(),
                obj.storage_offset(), obj.dtype, str(obj.device), storage.data_ptr(), storage.nbytes())


class Unshapes(pickle.Unpickler):
    """:class:`Shapes` read back, each tensor empty where the values were (tensors that shared memory still do)."""

    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def persistent_load(self, pid):
        parameter, grad, shape, stride, offset, dtype, device, address, nbytes = pid
        if address not in self.storages:
            self.storages[address] = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
        t = torch.empty(0, dtype=dtype, device=device).set_(self.storages[address], offset, shape, stride)
        return torch.nn.Parameter(t, grad) if parameter else t


def end_with_parent() -> None:
    while os.read(sys.stdin.fileno(), 4096):  # (until the pipe closes: not through sys.stdin, whose lock would stay
        pass                                  # taken when the process ends)
    os._exit(1)


def child() -> None:
    """The Python of :class:`Background`: it reads the parent's fournil, a model, a precision and where to keep each
    step (by rows), and compiles and keeps them with the same fournil (the steps' names are a hash of its source). On
    failure, its last line says why."""
    origin, model, dtype = Unshapes(sys.stdin.buffer).load()
    missing = pickle.load(sys.stdin.buffer)
    threading.Thread(target=end_with_parent, daemon=True).start()
    try:
        if Path(origin) != Path(fournil.__file__):
            raise FournilError(f"{sys.executable} imports the fournil of {fournil.__file__}, not {origin}")
        kernels.instructions()  # (fournil's kernels loaded: quantized layers call them)
        prepare_compile(model.device)
        next(iter(missing.values())).parent.mkdir(parents=True, exist_ok=True)  # (before, not after, a compilation)
        with decoding(model, dtype):
            for rows, path in missing.items():
                save(ahead_of_time(model, dtype, rows), path)
    except Exception as e:  # noqa: BLE001 - said to the parent, which answers without the step
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
