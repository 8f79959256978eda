"""`fournil bench` against lm-eval's own `hf` backend: SmolLM2-135M-Instruct on HellaSwag and GSM8K, same rows, same run.

    python benchmarks/bench_smollm2.py                     # every row: 10,042 + 1,319 (hours on 2 CPU cores)
    python benchmarks/bench_smollm2.py --hellaswag 200 --gsm8k 20

Both backends read the same weights in fp32 (the GGUF file dequantized into a Hugging Face folder for `hf`) and run
the same lm-eval tasks (fournil's bundled ones); `hf` with its default batch size (1) and with batches of 16. The
table gives the wall time of each, its ratio to fournil's, and the figures each reports.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from fournil.evaluate.bench import write_tasks
from fournil.evaluate.harness import FournilLM
from fournil.formats import export
from fournil.runs import Run

FIGURES = {"fournil_hellaswag": ("acc,none", "acc_norm,none"),
           "fournil_gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hellaswag", type=int, help="rows of HellaSwag (default: all 10,042; 0: none)")
    parser.add_argument("--gsm8k", type=int, help="problems of GSM8K (default: all 1,319; 0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        export(Run.load("smollm2", "cpu", "float32"), folder / "smol-hf", "hf")
        tasks = TaskManager(include_path=str(write_tasks(folder)), include_defaults=False)
        backends = {"fournil bench": lambda: FournilLM(model="smollm2", dtype="float32"),
                    "lm-eval hf, batch 1": lambda: HFLM(pretrained=str(folder / "smol-hf"), dtype="float32",
                                                        device="cpu", batch_size=1),
                    "lm-eval hf, batch 16": lambda: HFLM(pretrained=str(folder / "smol-hf"), dtype="float32",
                                                         device="cpu", batch_size=16)}
        print("| task | rows | backend | seconds | time vs fournil | figures |")
        print("| --- | ---: | --- | ---: | ---: | --- |")
        for task, limit in (("fournil_hellaswag", args.hellaswag), ("fournil_gsm8k", args.gsm8k)):
            if limit == 0:
                continue
            ours = None
            for name, make in backends.items():
                lm = make()
                start = time.perf_counter()
                results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, limit=limit,
                                                  bootstrap_iters=0, log_samples=False)
                seconds = time.perf_counter() - start
                ours = ours or seconds
                r = results["results"][task]
                figures = ", ".join(f"{k.split(',')[0]} ({k.split(',')[1]}) {r[k]:.4f}" for k in FIGURES[task])
                rows = results["n-samples"][task]["effective"]
                print(f"| {task} | {rows:,} | {name} | {seconds:.0f} | {seconds / ours:.2f}x | {figures} |", flush=True)


if __name__ == "__main__":
    main()
