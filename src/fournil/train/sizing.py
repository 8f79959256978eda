"""The budget-aware default: the default gpt on lines of text, sized to the compute its budget buys.

Trained longer, the default 200k-parameter model only overfits names: after 18,000 steps its training loss is 1.62
and its val NLL 1.94, no better than after 5,200. So the budget is counted in passes over the training split that
the default model would make in it (the steps given, or for ``--time`` its steps per second measured on this
machine in a short probe), and the more passes it buys, the wider and more regularized the model.

RULE was fitted on ``names`` runs at equal compute (the default model's steps at batch 64; a wider model gets the
steps it makes in the same time), listed in docs/benchmarks.md, "Sizing to the budget".
"""
from __future__ import annotations

import dataclasses

from fournil.config import RunConfig

# (from this many passes of the default model, model settings): the last row reached applies
RULE = (
    (0.0, {}),
    (15.0, {"dropout": 0.1}),
    (40.0, {"n_embd": 128, "dropout": 0.2}),
)
SIZES = ("n_layer", "n_head", "n_embd", "dropout")  # given any of them, the user sized the model: no rule
PROBE_STEPS, PROBE_SECONDS = 60, 10.0  # the machine's speed is measured over at most this many steps and seconds


def sizable(config: RunConfig, mode: str, processes: int) -> bool:
    """The rule sizes the default gpt on lines, in one process, when neither model sizes nor the optimizer's
    settings (batch, learning rate, optimizer, weight decay) were given."""
    t = config.train
    return (config.model.get("family") == "gpt" and mode == "lines" and processes == 1
            and not any(k in config.model for k in SIZES)
            and all(v is None for v in (t.batch_size, t.batch_tokens, t.lr, t.optimizer, t.weight_decay)))


def size_to_budget(config: RunConfig, train_docs: int, steps_per_second=None) -> RunConfig:
    """``config`` (completed with the default model) with the rule's settings for its budget, and the choice and
    its grounds recorded in ``config.budget``. ``steps_per_second()`` measures the default model (for --time)."""
    t = config.train
    rate = steps_per_second() if t.time else None
    steps = (rate * t.time) if t.time else t.steps
    if t.time and t.steps:
        steps = min(steps, t.steps)
    passes = steps * t.batch_size * t.grad_accum / train_docs
    chosen = [settings for start, settings in RULE if passes >= start][-1]
    record = {"default_model_steps": round(steps), "passes": round(passes, 1), "chosen": chosen}
    if rate is not None:
        record["steps_per_second"] = round(rate, 1)
    return dataclasses.replace(config, model={**config.model, **chosen}, budget=record)


def describe(record: dict) -> str:
    """The announcement of the choice, with the flags that make it by hand."""
    speed = f" ({record['steps_per_second']:g} steps/s measured)" if "steps_per_second" in record else ""
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in record["chosen"].items())
    return (f"budget: {record['default_model_steps']:,} steps of the default model{speed}, {record['passes']:g} passes "
            f"over the training split; " + (f"sized for it: {flags}" if flags else "the default size suits it"))
