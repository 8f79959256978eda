"""The budget-aware default: the default gpt sized by the passes over the data that its budget buys."""
import json
import math
from pathlib import Path

from conftest import CLI, losses
from fournil.config import TrainConfig
from fournil.models import build_model
from fournil.train.sizing import RULE, SPENDING

NAMES = Path(__file__).parent.parent / "src" / "fournil" / "data" / "files" / "names.txt"


def settings(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_more_passes_choose_a_larger_model_that_drops_out_more():
    models = [{k: v for k, v in chosen.items() if k not in SPENDING} for _, chosen in RULE]
    sizes = [build_model({"family": "gpt", "vocab_size": 27, "block_size": 16, **m}).num_params() for m in models]
    drops = [chosen.get("dropout", 0.0) for _, chosen in RULE]
    starts = [start for start, _ in RULE]
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert sizes == sorted(sizes) and drops == sorted(drops) and sizes[-1] > sizes[0]


def test_the_budget_sizes_the_default_and_flags_reproduce_the_choice(tmp_path):
    (tmp_path / "few.txt").write_text("".join(NAMES.read_text().splitlines(keepends=True)[:200]))
    cli = CLI(tmp_path)
    start, chosen = RULE[-1]
    steps = math.ceil(start * 180 / 64) + 2  # 180 training names (90 %), 64 a step: past the last row's passes
    out = cli("train", "--data", "few.txt", "--steps", str(steps), "--eval-every", "20", "--out", "sized")
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in chosen.items())
    assert f"sized for it: {flags}" in out.stdout
    sized = settings(tmp_path / "sized")
    assert sized["budget"]["passes"] >= start and sized["budget"]["chosen"] == chosen
    assert all(sized["model"][k] == v for k, v in chosen.items())

    by_hand = [x for k, v in chosen.items() for x in (f"--{k.replace('_', '-')}", f"{v:g}")]
    cli("train", "--data", "few.txt", "--steps", str(steps), "--eval-every", "20", *by_hand, "--out", "by-hand")
    assert settings(tmp_path / "by-hand")["budget"] == {}  # sizes given: the rule stays out
    assert losses(tmp_path / "by-hand") == losses(tmp_path / "sized")

    cli("train", "--data", "few.txt", "--steps", str(steps), "--dropout", "0", "--out", "mine")
    assert settings(tmp_path / "mine")["model"]["n_embd"] == 64 and settings(tmp_path / "mine")["budget"] == {}

    out = cli("train", "--data", "few.txt", "--steps", "1", "--out", "short")  # a --steps budget keeps its batch
    assert "the default size suits it" in out.stdout and settings(tmp_path / "short")["train"]["batch_size"] == 64
    assert "budget: 1 step of the default model, 0.36 passes over" in out.stdout  # 64 of 180 names, in 2 figures
    assert " parameters; 1 step, batch 64, " in out.stdout
    assert TrainConfig(steps=30, time=300).budget == "30 steps or 300 s, whichever ends first"  # ("and" before)


def test_a_time_budget_is_counted_in_steps_measured_on_this_machine(tmp_path):
    out = CLI(tmp_path)("train", "--data", "names", "--time", "4s", "--out", "timed")
    record = settings(tmp_path / "timed")["budget"]
    assert record["steps_per_second"] > 0 and "steps/s measured" in out.stdout
    assert abs(record["default_model_steps"] - 4 * record["steps_per_second"]) <= 1
    assert abs(record["passes"] - record["default_model_steps"] * 64 / 28829) < 0.06  # 28,829 training names
    spent = {k: v for k, v in RULE[0][1].items() if k in SPENDING}  # seconds buy a fraction of a pass: the first row
    assert record["chosen"] == RULE[0][1] and settings(tmp_path / "timed")["model"]["n_embd"] == 64
    assert {k: settings(tmp_path / "timed")["train"][k] for k in spent} == spent
    assert "sized for it: --batch-size 128 --lr 0.011" in out.stdout
