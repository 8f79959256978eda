"""Training in bf16 against fp32 on this CPU, model by model, and what ``--dtype auto`` picks for each.

    python benchmarks/cpu_precision.py             # the ladder's models, each a few minutes
    python benchmarks/cpu_precision.py --smollm2   # and SmolLM2's LoRA fine-tuning and distillation (about 15 more)

Each model trains for a few steps with ``FOURNIL_CPU_BF16=1`` (bf16 autocast) and ``=0`` (fp32), in turns, ``--rounds``
times each; the table gives the median tokens/s of each precision's fastest run (from the run's metrics, its first 20
steps left out), the ratio bf16 / fp32, and the precision ``auto`` picks for the model's width on this CPU
(:func:`fournil.device.cpu_bf16_pays`): it should be bf16 where the ratio is clearly above 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fournil.device import cpu_bf16_pays

QUICK = ["--eval-every", "1000", "--quiet"]
LADDER = [  # label, width, command
    ("default gpt, prénoms", 64, ["train", "--steps", "120"]),
    ("llama, prénoms", 64, ["train", "--model", "llama", "--steps", "120"]),
    ("mlp, prénoms", 24, ["train", "--model", "mlp", "--steps", "120"]),
    ("rnn, prénoms", 64, ["train", "--model", "rnn", "--steps", "120"]),
    ("gpt, Shakespeare", 128, ["train", "--data", "shakespeare", "--steps", "60"]),
    ("llama, Shakespeare", 128, ["train", "--data", "shakespeare", "--model", "llama", "--steps", "60"]),
    ("gpt 256 wide, names", 256, ["train", "--data", "names", "--n-embd", "256", "--steps", "40"]),
    ("gpt 384 wide, names", 384, ["train", "--data", "names", "--n-embd", "384", "--n-head", "6", "--steps", "40"]),
]
SMOLLM2 = [
    ("SmolLM2 LoRA fine-tuning", 576, ["finetune", "smollm2", "--lora", "--steps", "10"]),
    ("SmolLM2 distillation, layers:4", 576, ["distill", "--no-baseline", "--steps", "8"]),
]


def tokens_per_second(command: list[str], bf16: bool) -> float:
    """The median tokens/s a run logged after its first 20 steps."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        env = {**os.environ, "FOURNIL_CPU_BF16": "1" if bf16 else "0"}
        subprocess.run([sys.executable, "-m", "fournil", *command, *QUICK, "--out", str(out)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]  # (logged every 10 steps)
    return statistics.median(rates[2:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2's fine-tuning and distillation too")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.pop("FOURNIL_CPU_BF16", None)  # (what auto picks on this machine, whatever the shell forces)
    rows = []
    for label, width, command in LADDER + (SMOLLM2 if args.smollm2 else []):
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            for bf16 in (True, False):
                runs[bf16].append(tokens_per_second(command, bf16))
        bf16, fp32 = max(runs[True]), max(runs[False])
        rows.append((label, width, fp32, bf16, "bf16" if cpu_bf16_pays(width) else "fp32"))
        print(rows[-1], flush=True)
    print(f"\n{'model':<32} {'width':>5} {'fp32 tok/s':>10} {'bf16 tok/s':>10} {'bf16 / fp32':>11} {'auto picks':>10}")
    for label, width, fp32, bf16, auto in rows:
        print(f"{label:<32} {width:>5} {fp32:>10,.0f} {bf16:>10,.0f} {bf16 / fp32:>10.2f}x {auto:>10}")


if __name__ == "__main__":
    main()
