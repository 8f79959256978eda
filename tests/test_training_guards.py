"""Training that goes wrong stops with a clear message and loses nothing that was good."""
import json
import math
import re

import pytest
from conftest import losses

import fournil
from fournil import DataConfig, FournilError, LoraConfig, RunConfig, TrainConfig

ARGS = ["train", "--data", "names", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--quiet"]


def test_divergence_stops_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    # the warmup raises the learning rate by 0.1 a step: sane for 10 steps, then the loss explodes
    result = cli(*ARGS, "--lr", "20", "--steps", "2000", "--eval-every", "10", "--out", "boom", check=False)
    assert result.returncode == 2, result.stderr
    assert "training diverged at step" in result.stderr and "Traceback" not in result.stderr
    assert "the last good checkpoint is kept (step 10)" in result.stderr and "lower --lr" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "boom" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10]  # nothing diverged was logged...
    assert records[0]["train_loss"] < 3 * math.log(27)
    cli("eval", "boom")  # ...and the weights kept are good ones
    # diverging before its first checkpoint, a run leaves nothing to resume: its folder goes, and the same command,
    # with a lower rate, can run again
    result = cli(*ARGS, "--lr", "20", "--steps", "2000", "--eval-every", "1000", "--out", "early", check=False)
    assert "no checkpoint had been written yet" in result.stderr and not (tmp_path / "early").exists()
    cli(*ARGS, "--steps", "2", "--out", "early")


def test_a_damaged_checkpoint_is_reported_not_unpickled(cli, tmp_path):
    cli(*ARGS, "--steps", "20", "--eval-every", "10", "--out", "run")
    state = tmp_path / "run" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    result = cli("train", "--resume", "run", "--steps", "40", "--quiet", check=False)
    assert result.returncode == 2 and "is damaged" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x00" * 64)
    result = cli("eval", "run", check=False)
    assert result.returncode == 2 and "model.safetensors is damaged" in result.stderr


def test_a_student_that_starts_far_above_a_uniform_guess_is_not_taken_for_diverged(cli, tmp_path):
    """A Transformer cut down to its first layers (distillation's layers:N) can start far above the loss of a uniform
    guess: its run diverges only above twice the loss it started from. Here the teacher's final norm is scaled up,
    which makes every prediction, and the student's, overconfident."""
    from safetensors.torch import load_file, save_file

    cli(*ARGS, "--steps", "30", "--eval-every", "30", "--out", "teacher")
    weights = load_file(tmp_path / "teacher" / "model.safetensors")
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        weights[name] = weights[name] * 40
    save_file(weights, tmp_path / "teacher" / "model.safetensors", metadata={"format": "pt"})
    cli("distill", "--teacher", "teacher", "--student", "layers:1", "--steps", "3", "--eval-every", "3",
        "--no-baseline", "--quiet", "--out", "student")
    (_, first, _), *_ = losses(tmp_path / "student")
    assert first > 3 * math.log(27)  # (what was taken for a divergence)


def test_configs_given_to_the_python_api_are_checked_before_training(tmp_path):
    """What a recipe's settings get (types, ranges), a RunConfig built in Python gets too, before the data is read."""
    quiet = dict(progress=False, announce=lambda *_: None)
    with pytest.raises(FournilError, match=re.escape("model=5: give a family's name ('gpt') or its settings")):
        RunConfig(5)
    refused = [(RunConfig(train=None), "a RunConfig to train needs train=TrainConfig(...), not None"),
               (RunConfig(data=None), "a RunConfig to train needs data=DataConfig(...), not None"),
               (RunConfig("gpt", train=TrainConfig(steps="5")), "train setting steps = '5': expected a whole number"),
               (RunConfig("gpt", data=DataConfig(["a.txt"])), "data setting data = ['a.txt']: expected a text"),
               (RunConfig("gpt", train=TrainConfig(grad_accum=0)), "grad_accum must be at least 1 (got 0)"),
               (RunConfig("gpt", train=TrainConfig(warmup=-3)), "warmup must not be negative (got -3 steps)")]
    for config, message in refused:  # (AttributeError, TypeError, ValueError from deep inside, or a run, before)
        with pytest.raises(FournilError, match=re.escape(message)):
            fournil.train(config, out=str(tmp_path / "refused"), **quiet)
    out = dict(out=str(tmp_path / "refused"), **quiet)
    for stage, given, message in [
            (fournil.finetune, dict(lora=True), "fournil.finetune needs lora=LoraConfig(...), not True (LoraConfig()"),
            (fournil.finetune, dict(align="dpo"), "fournil.finetune needs align=AlignConfig(...), not 'dpo'"),
            (fournil.finetune, dict(train={"steps": 5}), "fournil.finetune needs train=TrainConfig(...), not {'steps"),
            (fournil.finetune, dict(lora=LoraConfig(rank="8")), "lora setting rank = '8': expected a whole number"),
            (fournil.finetune, dict(lora=LoraConfig(rank=0)), "--lora-rank must be at least 1 (got 0)"),
            (fournil.distill, dict(settings={"student": "layers:2"}), "fournil.distill needs settings=DistillConfig("),
            (fournil.distill, dict(data=5), "data setting data = 5: expected a text")]:  # (AttributeError, TypeError)
        with pytest.raises(FournilError, match=re.escape(message)):
            stage(**given, **out)  # before SmolLM2 loads, its data read
    assert not (tmp_path / "refused").exists()
    names = tmp_path / "few.txt"
    names.write_text("\n".join(["emma", "olivia", "ava", "mia", "noah", "liam", "lucas"] * 20))
    config = RunConfig("rnn", data=DataConfig(names), train=TrainConfig(steps=2, samples=0))  # a family, a Path
    run = fournil.train(config, out=str(tmp_path / "run"), **quiet)
    assert run.config.model["family"] == "rnn" and run.config.data.data == str(names)
    with pytest.raises(FournilError, match=re.escape("the prompt must be a text (got int 5)")):  # (a TypeError)
        run.sample(1, prompt=5)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["data"] == str(names)
    run = fournil.train(RunConfig(data=DataConfig(names), train=TrainConfig(steps=2, samples=0)), **quiet,
                        out=str(tmp_path / "gpt"))  # no model: as `fournil train`, the gpt
    assert run.config.model["family"] == "gpt" and run.config.model["n_layer"] >= 1


def test_fsdp_in_one_process_says_it_shards_nothing(tmp_path):
    said = []
    fournil.train(RunConfig(model={"family": "gpt", "n_layer": 1, "n_embd": 16}, data=DataConfig("names"),
                            train=TrainConfig(steps=1, fsdp=True, samples=0)), out=str(tmp_path / "run"),
                  progress=False, announce=said.append)  # (it trained as if no flag were given, without a word)
    assert "(--fsdp shards the model across processes, and this run has one: start it with torchrun" in said[0]


def test_a_model_too_large_to_train_in_this_memory_is_refused_before_its_weights_are_drawn(cli, tmp_path):
    """480 billion parameters (a width of 100,000): PyTorch's allocator failed with a traceback before; a width that
    fits in a gigabyte starts, whatever the machine's memory."""
    result = cli("train", "--n-embd", "100000", "--n-head", "1", "--steps", "1", "--device", "cpu", "--out", "huge",
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"a gpt model of 480,012,100,000 parameters needs at least 5,364.6 GiB to train \(12 bytes a "
                     r"parameter: its weight, gradient and momentum in fp32\), more than the [\d,.]+ GiB of this cpu: "
                     r"make it smaller \(--n-layer, --n-embd\)", result.stderr)
    assert not (tmp_path / "huge").exists()
    cli("train", "--n-embd", "1024", "--n-head", "8", "--n-layer", "1", "--data", "names", "--steps", "1", "--quiet",
        "--out", "wide")
