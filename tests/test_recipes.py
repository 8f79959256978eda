"""Runs as recipes: `fournil train --config FILE` (TOML, YAML, or the config.json a run wrote), flags overriding it."""
import json
import re
from pathlib import Path

import pytest

from conftest import CLI, InProcess, losses
from fournil.config import read_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
TINY = ["--data", "names", "--model", "gpt", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--quiet"]


def test_a_run_started_from_another_runs_config_gives_the_same_losses(tmp_path):
    cli = CLI(tmp_path)
    cli("train", *TINY, "--steps", "20", "--eval-every", "10", "--lr", "4e-3", "--out", "first")
    cli("train", "--config", "first/config.json", "--out", "again")
    first, again = losses(tmp_path / "first"), losses(tmp_path / "again")
    assert len(first) == 2 and all(loss and val for _, loss, val in first) and again == first
    settings = json.loads((tmp_path / "again" / "config.json").read_text())
    assert settings["model"]["n_embd"] == 32 and settings["train"]["lr"] == 4e-3

    cli("train", "--config", "first/config.json", "--steps", "4", "--n-embd", "48", "--out", "changed")  # flags win
    settings = json.loads((tmp_path / "changed" / "config.json").read_text())
    assert (settings["train"]["steps"], settings["model"]["n_embd"], settings["model"]["n_layer"]) == (4, 48, 1)


def stage(recipe: Path) -> str:
    """The command that reads a recipe: the one whose section it has (align before finetune, whose section it shares)."""
    text = recipe.read_text()
    return next((s for s in ("align", "distill", "finetune") if re.search(rf"^\[?{s}\]?:?\s*$", text, re.M)), "train")


def follows(run: Path, recipe: Path, command: str, steps: int) -> None:
    """The run's settings are the recipe's, but for the flags given beside it: --steps and --eval-tokens 256."""
    settings = json.loads((run / "config.json").read_text())
    wanted = read_recipe(recipe, command)
    assert (settings["train"]["steps"], settings["train"]["eval_tokens"]) == (steps, 256)
    assert settings["data"]["data"] == wanted.data.data
    if command == "train":
        assert settings["model"]["family"] == wanted.model["family"]
    for section in ("finetune", "align", "distill"):
        assert (settings[section] is None) == (getattr(wanted, section) is None)
    if wanted.finetune:
        assert settings["finetune"]["lora"]["rank"] == wanted.finetune.lora.rank
        assert settings["train"]["batch_size"] == wanted.train.batch_size


FINETUNE = "smollm2-lora-json.toml"  # started by the test that restarts a fine-tuning run from its config


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.iterdir() if p.name != FINETUNE))
def test_every_recipe_starts(tmp_path, recipe):
    command = stage(RECIPES / recipe)
    brief = ["--no-baseline"] if command == "distill" else []
    CLI(tmp_path)(command, "--config", RECIPES / recipe, "--steps", "2", "--eval-every", "2", "--eval-tokens", "256",
                  "--quiet", "--out", "run", *brief, timeout=600)
    follows(tmp_path / "run", RECIPES / recipe, command, steps=2)


def test_a_fine_tuning_run_started_from_its_config_gives_the_same_losses(tmp_path):
    cli = CLI(tmp_path)
    cli("finetune", "--config", RECIPES / FINETUNE, "--steps", "3", "--eval-every", "3", "--eval-tokens", "256",
        "--quiet", "--out", "first", timeout=600)
    follows(tmp_path / "first", RECIPES / FINETUNE, "finetune", steps=3)
    cli("finetune", "--config", "first/config.json", "--out", "again", timeout=600)
    first, again = losses(tmp_path / "first"), losses(tmp_path / "again")
    assert first and first[-1][2] and again == first
    out = cli("align", "--config", "first/config.json", check=False)  # each stage reads its own runs' configs
    assert out.returncode == 2 and "is for fournil finetune: give it to fournil finetune --config" in out.stderr


def test_a_recipe_that_cannot_be_read_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    # one real process, to see that nothing but the one line reaches the terminal; the rest through the same entry
    # point in this process
    out = CLI(tmp_path)("train", "--config", "missing.toml", check=False)
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    cli = InProcess(capsys, monkeypatch, tmp_path)
    cases = {
        "typo.toml": ('[model]\nfamily = "gpt"\n[trian]\nsteps = 3\n', "unknown section(s) trian"),
        "key.toml": ('[train]\nstep = 3\n', "unknown train setting(s) step"),
        "broken.toml": ('[train\nsteps = 3\n', "does not parse"),
        "broken.yaml": ("train: [steps\n", "does not parse"),
        "nofamily.yaml": ("model:\n  n_layer: 2\n", "needs a family"),
        "recipe.ini": ("[train]\n", "a .toml, .yaml or .json file"),
        "tuned.json": (json.dumps({"model": {"family": "llama"}, "finetune": {"base": "smollm2"}}),
                       "is for fournil finetune: give it to fournil finetune --config"),
        "dpo.toml": ((RECIPES / "smollm2-dpo.toml").read_text(), "is for fournil align: give it to fournil align"),
        # (it said "the config of a align run")
        "words.toml": ('[train]\nsteps = "ten"\n', "train setting steps = 'ten': expected a whole number"),
        "split.toml": ("[data]\nsplit = 3\n", "data setting split = 3: expected a list of 3 numbers"),
        "layers.yaml": ("model:\n  family: gpt\n  n_layer: 2.5\n", "n_layer='2.5': expected a whole number"),
        "yes.json": (json.dumps({"model": {"family": "gpt"}, "train": {"batch_size": True}}),
                     "train setting batch_size = True: expected a whole number"),
        "plural.toml": ('[model]\nfamily = "gpt"\nn_layers = 2\n', "model gpt has no setting(s) n_layers; it has "),
        "config.json": (json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 9}),
                        "config.json is a Hugging Face model's config (llama), not a recipe: give the model's folder "
                        "itself where a command takes a model (fournil finetune "),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        out = cli("train", "--config", name, check=False)
        # one line, and nothing before it (the parser's usage of every flag; the budget sized for a model refused)
        assert out.returncode == 2 and out.stderr.startswith("fournil: error: ") and out.stderr.count("\n") == 1, \
            (name, out.stderr)
        assert message in out.stderr and not out.stdout, (name, out.stdout)
    (tmp_path / "nobase.toml").write_text("[finetune]\nmax_length = 64\n")
    out = cli("finetune", "--config", "nobase.toml", check=False)
    assert out.returncode == 2 and "the finetune settings need base" in out.stderr
    (tmp_path / "thirds.toml").write_text('[finetune]\nbase = "smollm2"\n[data]\nsplit = [0.3, 0.3, 0.3]\n')
    out = cli("finetune", "--config", "thirds.toml", check=False)  # (the test examples got what was left: 40 %)
    assert out.returncode == 2 and "--split must be three positive fractions that add up to 1, e.g. 0.9,0.05,0.05 " \
                                   "(got 0.3,0.3,0.3)" in out.stderr
    for command in ("train", "finetune", "distill"):
        out = cli(command, "--config", "missing.toml", check=False)
        assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr, command
