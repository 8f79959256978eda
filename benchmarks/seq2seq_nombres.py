"""The encoder-decoder on the bundled nombres task: digits to French words, on numbers never seen in training.

    python benchmarks/seq2seq_nombres.py           # the default model and budget (`fournil train --model seq2seq
                                                   # --data nombres`), then greedy and beam-search decoding of test
    python benchmarks/seq2seq_nombres.py --quick   # 60 steps, to check the script

The goal: at least 95 % of the test numbers written exactly right within 10 minutes of CPU training. Prints the
training time, parameters, val and test NLL, test exact match (greedy and beam of width 4, and by number length)
and character error rate, as a table; and how many of the numbers below 1,000 it trained on it writes right (the
first a person types).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import fournil
from fournil.config import read_recipe
from fournil.evaluate import output_scores

GOAL, BUDGET = 0.95, 600.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 steps")
    p.add_argument("--beam", type=int, default=4)
    args = p.parse_args()
    config = read_recipe(Path(__file__).parent.parent / "recipes" / "nombres-seq2seq.yaml")
    config.train.steps = 60 if args.quick else None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = fournil.train(config, out=str(Path(tmp) / "nombres"), progress=False, announce=print)
        seconds = time.perf_counter() - start
        scores = run.evaluate()
        sources, targets = map(list, zip(*run.splits().test))
        start = time.perf_counter()
        beamed = run.translate(sources, beam=args.beam)
        beam_seconds = time.perf_counter() - start
        greedy = run.translate(sources)
        seen = sorted({pair for pair in run.splits().train if len(pair[0]) <= 3})  # what a person types first
        recalled = run.translate([source for source, _ in seen])
    beam = output_scores(beamed, targets)
    test = scores["test"]
    print()
    print(f"| model | parameters | train steps | train time | val NLL | test NLL | test exact (greedy) | "
          f"test exact (beam {args.beam}) | test CER (greedy) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| seq2seq {run.model.config.n_layer}+{run.model.config.n_layer} layers, width {run.model.config.n_embd} | "
          f"{run.model.num_params():,} | {run.config.train.steps} | {seconds:.0f} s | {scores['val']['nll']:.4f} | "
          f"{test['nll']:.4f} | {100 * test['exact']:.2f} % | {100 * beam['exact']:.2f} % | {100 * test['cer']:.3f} % |")
    print()
    print("| test numbers | count | exact (greedy) |")
    print("| --- | ---: | ---: |")
    for name, keep in {"below 1,000": lambda s: len(s) <= 3, "4 digits": lambda s: len(s) == 5,
                       "5 digits": lambda s: len(s) == 6, "6 digits": lambda s: len(s) == 7}.items():
        rows = [(o, t) for s, o, t in zip(sources, greedy, targets) if keep(s)]
        print(f"| {name} | {len(rows):,} | {100 * sum(o == t for o, t in rows) / max(1, len(rows)):.2f} % |")
    right = sum(o == t for o, (_, t) in zip(recalled, seen))
    print(f"| below 1,000, trained on (not test) | {len(seen):,} | {100 * right / len(seen):.2f} % |")
    print()
    met = test["exact"] >= GOAL and seconds <= BUDGET
    print(f"goal: >= {100 * GOAL:.0f} % exact on test within {BUDGET / 60:.0f} minutes of training: "
          f"{'met' if met else 'NOT met'} ({100 * test['exact']:.2f} % in {seconds:.0f} s; beam search of "
          f"{len(sources):,} sources took {beam_seconds:.0f} s)")
    wrong = [(s, o, t) for s, o, t in zip(sources, greedy, targets) if o != t][:5]
    for s, o, t in wrong:
        print(f"  wrong: {s} -> {o}   (expected: {t})")


if __name__ == "__main__":
    main()
