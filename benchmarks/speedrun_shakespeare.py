"""Time to quality on Shakespeare at character level, against nanoGPT's CPU recipe.

    python benchmarks/speedrun_shakespeare.py                    # fournil's own recipe
    python benchmarks/speedrun_shakespeare.py --recipe nanogpt   # nanoGPT's exact recipe, run by fournil
    python benchmarks/speedrun_shakespeare.py --nanogpt ~/nanoGPT  # also time a nanoGPT checkout, same machine

The model size is nanoGPT's documented CPU model: 4 layers, 4 heads, width 128, context 64 (about 0.8M parameters).
nanoGPT's recipe is batch 12, 2,000 iterations, learning rate 1e-3 with 100 warmup steps and cosine decay to 1e-4,
fp32, validation every 250 iterations. fournil's recipe keeps the size and changes the rest: the Llama block
(rotary positions, RMSNorm, SwiGLU) with the same parameter count, a higher learning rate decayed to zero, fewer
steps, the precision fournil picks for the machine.

The text is split as nanoGPT splits it: the first 90 % trains. ``val_loss`` is the NLL (nats per character) over the
last 10 %, nanoGPT's val split, which is fournil's val and test splits together; the seconds count everything from
reading the data to that final score. The last line is ``val_loss=<x> seconds=<y> run=<run directory>``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import fournil
from fournil.config import read_recipe
from fournil.data.sources import read_text

RECIPES = {"fournil": "shakespeare-speedrun.toml", "nanogpt": "shakespeare-nanogpt.toml"}  # in recipes/
RECIPE_DIR = Path(__file__).parent.parent / "recipes"
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def run_fournil(recipe: str, out: Path) -> dict:
    config = read_recipe(RECIPE_DIR / RECIPES[recipe])
    start = time.perf_counter()
    run = fournil.train(config, out=str(out), progress=True)
    scores = run.evaluate()
    seconds = time.perf_counter() - start
    val, test = scores["val"], scores["test"]
    records = run.path.joinpath("metrics.jsonl").read_text().splitlines()
    speed = [r for r in map(json.loads, records) if "tokens_per_s" in r]
    tail = speed[len(speed) // 2:]  # past the warmup of the first steps
    return {"recipe": f"fournil --recipe {recipe}", "params": run.model.num_params(), "seconds": seconds,
            "val_loss": (val["nll"] * val["tokens"] + test["nll"] * test["tokens"]) / (val["tokens"] + test["tokens"]),
            "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
            "mfu": sum(r["mfu"] for r in tail) / len(tail), "dtype": str(run.dtype).removeprefix("torch."),
            "run": str(run.path)}


def run_nanogpt(checkout: Path) -> dict:
    """nanoGPT's own train.py on the same text, split and model, with its documented CPU flags."""
    text = read_text("shakespeare")
    data = checkout / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))  # nanoGPT's prepare.py, without its download
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:  # written for nanoGPT, never read by fournil
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *NANOGPT_ARGS], cwd=checkout, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"nanoGPT failed:\n{done.stderr[-2000:]}")
    val = float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", done.stdout)[-1])
    times = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", done.stdout)][10:]
    step_s = sorted(times)[len(times) // 2] / 1000
    return {"recipe": "nanoGPT train.py", "params": None, "seconds": seconds, "val_loss": val,
            "tokens_per_s": 12 * 64 / step_s, "mfu": None, "dtype": "float32", "run": str(checkout / "out-shakespeare-char")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default="fournil")
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to time on this machine in the same run")
    p.add_argument("--out", type=Path, help="run directory (default: runs/speedrun-RECIPE)")
    args = p.parse_args()
    out = args.out or Path("runs") / f"speedrun-{args.recipe}"
    if out.exists():
        sys.exit(f"{out} exists: remove it or pass --out")
    rows = [run_nanogpt(args.nanogpt.expanduser())] if args.nanogpt else []
    mine = run_fournil(args.recipe, out)
    rows.append(mine)
    print(f"\n{'recipe':<26} {'dtype':<9} {'val loss':>8} {'seconds':>8} {'tokens/s':>9} {'MFU':>5} {'time ratio':>10}")
    for r in rows:
        ratio = f"{r['seconds'] / rows[0]['seconds']:.2f}" if args.nanogpt else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        print(f"{r['recipe']:<26} {r['dtype']:<9} {r['val_loss']:>8.4f} {r['seconds']:>8.1f} {r['tokens_per_s']:>9,.0f} "
              f"{mfu:>5} {ratio:>10}")
    print("MFU is against the matrix-product rate fournil measures on this machine, in the run's precision.")
    print(f"val_loss={mine['val_loss']:.4f} seconds={mine['seconds']:.1f} run={mine['run']}")


if __name__ == "__main__":
    main()
