"""The ladder of models on the bundled first names, and fournil's gpt against makemore's recipe.

    python benchmarks/ladder.py            # every model on prenoms and names, gpt for 5 minutes
    python benchmarks/ladder.py --quick    # 30-second budgets, to check the script

For each dataset and model it trains with the default sizes for a fixed wall-clock budget (mlp 1 min,
rnn 2 min, gpt 5 min; the n-gram just counts), then prints
parameters, train time, val and test NLL (nats per token). On names it also trains the same-size
Transformer with AdamW instead of Muon, and with makemore's recipe (AdamW, batch 32, constant lr 5e-4, weight decay
0.01, no dropout), for the same budget, and prints the ratios of test NLLs. makemore's own default reaches 1.976
after 5 minutes here.
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30-second budgets")
    p.add_argument("--data", nargs="+", default=["prenoms", "names"])
    p.add_argument("--models", nargs="+", default=["ngram", "mlp", "rnn", "gpt"])
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
    print()
    print("| data | model | parameters | train time | val NLL | test NLL |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['model']} | {r['params']:,} | {r['seconds']:.0f} s | {r['val']:.4f} | {r['test']:.4f} |")
    ours = next((r for r in rows if r["data"] == "names" and r["model"] == "gpt"), None)
    for name in ("gpt, AdamW", "gpt, makemore recipe"):
        ref = next((r for r in rows if r["model"] == name), None)
        if ours and ref:
            print(f"names, gpt test NLL: fournil's default {ours['test']:.4f} / {name} {ref['test']:.4f} "
                  f"= {ours['test'] / ref['test']:.3f}")
    if ours:
        print(f"target: at or below 1.95 (makemore's own default: 1.976); fournil's default: {ours['test']:.4f}")


if __name__ == "__main__":
    main()
