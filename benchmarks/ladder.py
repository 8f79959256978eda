"""The ladder of models on the bundled first names, and fournil's gpt against makemore's recipe.

    python benchmarks/ladder.py            # every model on prenoms and names, gpt for 5 minutes
    python benchmarks/ladder.py --quick    # 30-second budgets, to check the script
    python benchmarks/ladder.py --data names --models gpt --makemore ~/makemore   # and makemore's own code, same run

For each dataset and model it trains with the default sizes for a fixed wall-clock budget (mlp 1 min,
rnn 2 min, gpt 5 min; the n-gram just counts), then prints
parameters, train time, val and test NLL (nats per token). On names it also trains the same-size
Transformer with AdamW instead of Muon, and with makemore's recipe (AdamW, batch 32, constant lr 5e-4, weight decay
0.01, no dropout), for the same budget, and prints the ratios of test NLLs. With --makemore, a checkout of
makemore's code trains its default Transformer on the same names for the same wall-clock time, and its best test
loss (on its own split, 1,000 names) joins the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fournil
from fournil.config import DataConfig, RunConfig, TrainConfig, read_recipe

BUDGETS = {"mlp": 60.0, "rnn": 120.0, "gpt": 300.0}  # seconds of training per model
MAKEMORE = Path(__file__).parent.parent / "recipes" / "names-makemore.toml"  # makemore's model and recipe


def run_one(out: Path, data: str, model: dict, train: dict) -> dict:
    return run_config(out, RunConfig(model=model, data=DataConfig(data), train=TrainConfig(samples=0, **train)))


def run_config(out: Path, config: RunConfig) -> dict:
    data, model = config.data.data, config.model
    start = time.perf_counter()
    run = fournil.train(config, out=str(out), progress=False, announce=lambda *_: None)
    seconds = time.perf_counter() - start
    scores = run.evaluate()
    return {"data": data, "model": model["family"], "params": run.model.num_params(), "seconds": seconds,
            "val": scores["val"]["nll"], "test": scores["test"]["nll"]}


def run_makemore(checkout: Path, seconds: float, work: Path) -> dict:
    """makemore's own makemore.py on the bundled names, its defaults, stopped after ``seconds``; the best of the test
    losses it prints every 500 steps (it keeps that model)."""
    names = work / "names.txt"
    names.write_text((Path(fournil.__file__).parent / "data" / "files" / "names.txt").read_text())
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(checkout / "makemore.py"), "-i", str(names), "-o", str(work / "mm")],
                              capture_output=True, text=True, timeout=seconds,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # what it printed before it was stopped
        sys.exit(f"makemore stopped by itself:\n{done.stderr[-2000:]}")
    except subprocess.TimeoutExpired as stopped:
        out = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
    tests = [float(x) for x in re.findall(r"test loss:? ([\d.]+)", out)]
    if not tests:
        sys.exit(f"makemore printed no test loss in {seconds:g} s:\n{out[-2000:]}")
    return {"data": "names", "model": "makemore's own code", "params": None, "seconds": time.perf_counter() - start,
            "val": float("nan"), "test": min(tests)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30-second budgets")
    p.add_argument("--data", nargs="+", default=["prenoms", "names"])
    p.add_argument("--models", nargs="+", default=["ngram", "mlp", "rnn", "gpt"])
    p.add_argument("--makemore", type=Path, help="a checkout of karpathy/makemore to train in the same run")
    args = p.parse_args()
    gpt_time = 30.0 if args.quick else BUDGETS["gpt"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for family in args.models:
                train = {"time": BUDGETS[family] if not args.quick else 30.0} if family != "ngram" else {}
                rows.append(run_one(Path(tmp) / f"{data}-{family}", data, {"family": family}, train))
                print(json.dumps(rows[-1]), flush=True)
            if data == "names" and "gpt" in args.models:  # the same model with AdamW, and with makemore's recipe
                adamw = run_one(Path(tmp) / "adamw", data, {"family": "gpt"},
                                {"optimizer": "adamw", "weight_decay": 0.1, "time": gpt_time})  # the defaults before Muon
                makemore = read_recipe(MAKEMORE)
                makemore.train.time = gpt_time
                ref = run_config(Path(tmp) / "makemore", makemore)
                adamw["model"], ref["model"] = "gpt, AdamW", "gpt, makemore recipe"
                rows += [adamw, ref]
                print(json.dumps(adamw), json.dumps(ref), sep="\n", flush=True)
                if args.makemore:
                    rows.append(run_makemore(args.makemore.expanduser(), gpt_time, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    print()
    print("| data | model | parameters | train time | val NLL | test NLL |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] else "-"
        print(f"| {r['data']} | {r['model']} | {params} | {r['seconds']:.0f} s | {r['val']:.4f} | {r['test']:.4f} |")
    ours = next((r for r in rows if r["data"] == "names" and r["model"] == "gpt"), None)
    for name in ("gpt, AdamW", "gpt, makemore recipe", "makemore's own code"):
        ref = next((r for r in rows if r["model"] == name), None)
        if ours and ref:
            print(f"names, gpt test NLL: fournil's default {ours['test']:.4f} / {name} {ref['test']:.4f} "
                  f"= {ours['test'] / ref['test']:.3f}")
    if ours:
        print(f"target: at or below 1.95; fournil's default: {ours['test']:.4f}")


if __name__ == "__main__":
    main()
