"""Test NLL against compute on the first names: the budget-aware default beside the fixed-size default model.

    python benchmarks/scaling_names.py                          # names and prenoms, 30 s to 10 min (about 75 min)
    python benchmarks/scaling_names.py --data names --budgets 60 120 300 600
    python benchmarks/scaling_names.py --quick                  # 10 and 20 s on names, to check the script

For each budget it trains `fournil train --data D --time T` (the default: sized by the budget) and the same with the
default model's size given (4 layers, width 64, no dropout, batch 64: the model the defaults had before; the same run
where the budget chose all of that), prints a table of parameters, steps, tokens, compute (tokens x parameters), val
and test NLL, and draws test NLL against compute: into docs/images/scaling_names.png for the whole default run, into
scaling_names.png here for a shorter one (--quick, other --data or --budgets), or into --plot.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import fournil
from fournil.config import DataConfig, RunConfig, TrainConfig
from fournil.models import DEFAULTS

FIXED = {"n_layer": 4, "n_head": 4, "n_embd": 64, "dropout": 0.0}  # the default model's size, given explicitly
PICTURE = Path(__file__).parent.parent / "docs" / "images" / "scaling_names.png"


def train_once(out: Path, data: str, seconds: float, model: dict) -> dict:
    config = RunConfig(model={"family": "gpt", **model}, data=DataConfig(data), train=TrainConfig(time=seconds, samples=0))
    run = fournil.train(config, out=str(out), progress=False, announce=lambda *_: None)
    scores = run.evaluate()
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    train_names = run.splits().train
    tokens = steps * run.config.train.batch_size * (sum(map(len, train_names)) / len(train_names) + 1)
    params = run.model.num_params()
    return {"data": data, "budget_s": seconds, "model": "fixed" if model else "default", "params": params,
            "width": run.model.config.n_embd, "dropout": run.model.config.dropout,
            "batch": run.config.train.batch_size, "steps": steps,
            "tokens": round(tokens), "compute": tokens * params, "val": scores["val"]["nll"],
            "test": scores["test"]["nll"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for (data, model), color in zip(sorted({(r["data"], r["model"]) for r in rows}),
                                    ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        mine = sorted((r for r in rows if (r["data"], r["model"]) == (data, model)), key=lambda r: r["compute"])
        style = "o-" if model == "default" else "s--"
        ax.plot([r["compute"] for r in mine], [r["test"] for r in mine], style, color=color,
                label=f"{data}, {'default (sized by the budget)' if model == 'default' else 'fixed size (203k)'}")
        for r in mine:
            ax.annotate(f"{r['budget_s']:g}s", (r["compute"], r["test"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("compute: tokens seen x parameters")
    ax.set_ylabel("test NLL (nats per character)")
    ax.set_title("More compute, better names: the default sized by its budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["names", "prenoms"])
    p.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 300, 600], help="seconds")
    p.add_argument("--fixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the fixed-size model at each budget")
    p.add_argument("--quick", action="store_true", help="10 and 20 s on names")
    p.add_argument("--plot", type=Path, help="the picture (default: the docs' for the whole default run, else "
                                              "scaling_names.png here)")
    args = p.parse_args()
    if args.quick:
        args.data, args.budgets = ["names"], [10, 20]
    whole = (args.data, args.budgets, args.fixed) == (p.get_default("data"), p.get_default("budgets"), True)
    args.plot = args.plot or (PICTURE if whole else Path("scaling_names.png"))  # (a check never redraws the docs')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for seconds in args.budgets:
                rows.append(train_once(Path(tmp) / f"{data}-{seconds:g}", data, seconds, {}))
                if args.fixed:  # the fixed-size model, unless the budget chose that size itself
                    same = (rows[-1]["width"], rows[-1]["dropout"], rows[-1]["batch"]) == (
                        FIXED["n_embd"], FIXED["dropout"], DEFAULTS[("gpt", "lines")][1]["batch_size"])
                    rows.append({**rows[-1], "model": "fixed"} if same else
                                train_once(Path(tmp) / f"{data}-{seconds:g}-fixed", data, seconds, FIXED))
                print(*map(json.dumps, rows[-1 - args.fixed:]), sep="\n", flush=True)
    print("\n| data | budget | model | parameters | width, dropout, batch | steps | tokens | compute | val NLL | test NLL |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['budget_s']:g} s | {r['model']} | {r['params']:,} | "
              f"{r['width']}, {r['dropout']:g}, {r['batch']} | "
              f"{r['steps']:,} | {r['tokens']:,} | {r['compute']:.2e} | {r['val']:.4f} | {r['test']:.4f} |")
    plot(rows, args.plot)
    print(f"\npicture: {args.plot}")


if __name__ == "__main__":
    main()
