"""The budget-aware default: the default gpt on lines of text, sized to the compute its budget buys.

Trained longer, the default 200k-parameter model only overfits names: its test NLL is 1.946 after 6,300 steps of 64
names (14 passes over the training split) and 1.946 after 10,000 (22 passes), while its training loss falls from
1.74 to 1.66; after 10 minutes here (48 passes) it is 1.970. So the budget is counted in passes over the training
split that the default model would make in it (the steps given, or for ``--time`` its steps per second measured on
this machine in a short probe), past 17 passes the model is wider and drops out, and below 14 a time budget is
spent in larger batches.

RULE was fitted on ``names`` runs at equal compute: each budget as steps of the default model, and a wider model
given the steps it makes in the same time on the same CPU (2-core AMD EPYC, AVX512-BF16). Test NLL (docs/
benchmarks.md, "Sizing to the budget"):

    passes of the default model   width 64   64, dropout 0.1   96, dropout 0.1   96, dropout 0.2   128, dropout 0.2
    7.3 (3,300 steps)             1.9588     1.9906            1.9889            -                 -
    14 (6,300)                    1.9457     -                 1.9538            -                 -
    22 (10,000)                   1.9455     1.9399            1.9321            1.9596            -
    40 (18,000)                   -          -                 1.9119            1.9296            -
    67 (30,000)                   -          -                 1.9101            1.9163            1.9264

Width 96 at 7.3 passes without dropout: 1.9609; a higher learning rate (1.2e-2) for width 64 there: 1.9711.

Below 14 passes a time budget buys more names in batches of 128 (1.45 times the time of a batch of 64 on that CPU,
with lr 1.1e-2): the default model, still learning from each name, gains more from them than from the steps. At
equal time, test NLL (batch 64, then 128):

    passes of the default model   batch 64                          batch 128, lr 1.1e-2
    10.3 (4,650 steps)            1.9578, 1.9524, 1.9528 (3 seeds)  1.9436, 1.9442, 1.9505 (3,200 steps)
    13.0 (5,856)                  1.9563                            1.9471 (4,040)
    16.8 (7,560)                  1.9466                            1.9575 (5,200: 23 passes over the names, overfit)
"""
from __future__ import annotations

import dataclasses

from fournil.config import RunConfig

# (from this many passes of the default model, settings): the last row reached applies. Measured up to 67 passes;
# beyond, the last row holds, unmeasured.
RULE = (
    (0.0, {"batch_size": 128, "lr": 1.1e-2}),
    (14.0, {}),
    (17.0, {"n_embd": 96, "dropout": 0.1}),
)
SPENDING = ("batch_size", "lr")  # how a time budget is spent; a --steps budget keeps the batch its steps were given for
SIZES = ("n_layer", "n_head", "n_embd", "dropout")  # given any of them, the user sized the model: no rule
PROBE_STEPS, PROBE_SECONDS = 60, 10.0  # the machine's speed is measured over at most this many steps and seconds


def sizable(config: RunConfig, mode: str, processes: int) -> bool:
    """The rule sizes the default gpt on lines, in one process, when neither model sizes nor the optimizer's
    settings (batch, learning rate, optimizer, weight decay) were given."""
    t = config.train
    return (config.model.get("family") == "gpt" and mode == "lines" and processes == 1
            and not any(k in config.model for k in SIZES)
            and all(v is None for v in (t.batch_size, t.batch_tokens, t.lr, t.optimizer, t.weight_decay)))


def size_to_budget(config: RunConfig, train_docs: int, steps_per_second) -> RunConfig:
    """``config`` (completed with the default model) with the rule's settings for its budget, and the choice and
    its grounds recorded in ``config.budget``. ``steps_per_second()`` measures the default model (for --time)."""
    t = config.train
    rate = steps_per_second() if t.time else None
    steps = (rate * t.time) if t.time else t.steps
    if t.time and t.steps:
        steps = min(steps, t.steps)
    passes = steps * t.batch_size * t.grad_accum / train_docs
    chosen = [settings for start, settings in RULE if passes >= start][-1]
    if not t.time:
        chosen = {k: v for k, v in chosen.items() if k not in SPENDING}
    passes = round(passes, 1) if passes >= 1 else float(f"{passes:.2g}")  # (a fraction of a pass in 2 figures)
    record = {"default_model_steps": round(steps), "passes": passes, "chosen": chosen}
    if rate is not None:
        record["steps_per_second"] = round(rate, 1)
    model = {k: v for k, v in chosen.items() if k not in SPENDING}
    train = dataclasses.replace(t, **{k: v for k, v in chosen.items() if k in SPENDING})
    return dataclasses.replace(config, model={**config.model, **model}, train=train, budget=record)


def describe(record: dict) -> str:
    """The announcement of the choice, with the flags that make it by hand."""
    speed = f" ({record['steps_per_second']:g} steps/s measured)" if "steps_per_second" in record else ""
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in record["chosen"].items())
    steps, passes = record["default_model_steps"], record["passes"]
    return (f"budget: {steps:,} step{'s' * (steps != 1)} of the default model{speed}, {passes:g} "
            f"pass{'es' * (passes != 1)} over the training split; "
            + (f"sized for it: {flags}" if flags else "the default size suits it"))
