"""A run killed with SIGKILL leaves a readable checkpoint, and --resume carries on from it exactly."""
import json
import re
import signal
import subprocess
import time

from safetensors import safe_open

from conftest import InProcess, held_elsewhere
from fournil.train.metrics import MetricsLog

# with dropout: a resumed run draws the masks the uninterrupted one drew (from PyTorch's generator, restored)
ARGS = ["train", "--data", "names", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--dropout", "0.1",
        "--eval-every", "20", "--quiet"]


def checkpoint_info(run) -> dict:
    with safe_open(str(run / "train_state.safetensors"), "pt") as f:
        return json.loads(f.metadata()["fournil"])["info"]


def checkpoint_step(run) -> int:
    return checkpoint_info(run)["step"] if (run / "train_state.safetensors").exists() else 0


def train_losses(run) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["train_loss"] for m in map(json.loads, lines) if "train_loss" in m}


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(cli, tmp_path):
    cli(*ARGS, "--steps", "100", "--out", "whole")
    whole = train_losses(tmp_path / "whole")

    proc = cli.popen(*ARGS, "--steps", "100", "--out", "killed")
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while checkpoint_step(run) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(run)
    assert 40 <= step < 100, "the run should be killed mid-way"
    assert (run / "model.safetensors").exists()
    cli("eval", run)  # the last checkpoint is readable as it is

    said = cli("train", "--resume", run, "--quiet").stdout
    assert f"; 100 steps (from step {step}), batch " in said.splitlines()[0]  # where it takes up, said
    resumed = train_losses(run)
    assert sorted(resumed) == sorted(whole)
    assert resumed == whole  # bit for bit: model, optimizer, data position and random state were restored


def test_a_run_is_trained_by_one_process_at_a_time(cli, tmp_path):
    """A --resume of a run still training, or a second process starting the same new run, is refused: both trained
    it, their metrics interleaved and each writing its checkpoints over the other's."""
    proc = cli.popen(*ARGS, "--steps", "100000", "--out", "going")
    run = tmp_path / "going"
    deadline = time.time() + 120
    while checkpoint_step(run) < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    refused = cli("train", "--resume", run, check=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert refused.returncode == 2 and refused.stderr == (f"fournil: error: {run} is being trained by another process "
                                                          f"now: wait for it to end, or stop it first\n")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # one process's records
    step = checkpoint_step(run)
    cli("train", "--resume", run, "--steps", str(step + 20))  # the lock went with the killed process
    assert checkpoint_step(run) == step + 20

    with held_elsewhere(tmp_path / "new"):  # another process holds the folder of a new run that this one found free
        refused = cli(*ARGS, "--steps", "20", "--out", "new", check=False)
    assert refused.returncode == 2 and refused.stderr.endswith(
        "fournil: error: new is being trained by another process now: wait for it to end, or stop it first; or start "
        "another run with --out new-2\n") and not (tmp_path / "new" / "config.json").exists()
    cli(*ARGS, "--steps", "20", "--out", "new")  # the folder free again


def test_a_step_is_logged_before_the_checkpoint_that_covers_it(tmp_path, capsys, monkeypatch):
    # a kill between the two runs the step again on --resume; in the other order, the resumed run started after a step
    # whose record was never written (it failed so once here, the kill above landing between them)
    logged = []
    log = MetricsLog.log
    monkeypatch.setattr(MetricsLog, "log", lambda self, record: (
        logged.append((record["step"], checkpoint_step(tmp_path / "run"))), log(self, record)))
    assert InProcess(capsys, monkeypatch, tmp_path)(*ARGS, "--steps", "40", "--out", "run").returncode == 0
    assert logged == [(10, 0), (20, 0), (30, 20), (40, 20)]  # (each record's step, the checkpoint's when it was logged)
    assert checkpoint_step(tmp_path / "run") == 40

    metrics = MetricsLog(tmp_path / "run", tensorboard=False)
    metrics.truncate(20)  # after a kill: what the checkpoint holds, and no more
    assert [r["step"] for r in metrics.read()] == [10, 20]
    metrics.truncate(0)  # killed before any checkpoint: the run starts again from nothing
    assert metrics.read() == []


def test_every_eval_every_step_is_validated_and_checkpointed_even_between_records(tmp_path, capsys, monkeypatch):
    # records come every 10 steps; --eval-every 15 once validated at 30 only (the steps both divide), so a kill at step 29
    # lost all of it
    logged = []
    log = MetricsLog.log
    monkeypatch.setattr(MetricsLog, "log", lambda self, record: (
        logged.append((record["step"], "val_loss" in record, checkpoint_step(tmp_path / "run"))), log(self, record)))
    args = [a if a != "20" else "15" for a in ARGS]
    assert InProcess(capsys, monkeypatch, tmp_path)(*args, "--steps", "35", "--out", "run").returncode == 0
    # (each record's step, whether it was validated, the checkpoint's step when it was logged)
    assert logged == [(10, False, 0), (15, True, 0), (20, False, 15), (30, True, 15), (35, True, 30)]
    assert checkpoint_step(tmp_path / "run") == 35


def test_resume_with_a_new_budget_continues(cli, tmp_path):
    cli(*ARGS, "--steps", "20", "--out", "short")
    cli("train", "--resume", "short", "--steps", "40", "--quiet")
    steps = sorted(train_losses(tmp_path / "short"))
    assert steps[-1] == 40 and steps.count(20) == 1
    # a budget already spent is said, not run as if it trained
    refused = cli("train", "--resume", "short", "--steps", "30", check=False)
    assert refused.returncode == 2 and re.fullmatch(
        r"fournil: error: short stopped at step 40, after ([\d.]+) s of training, past the budget given \(30 steps\): "
        r"to train on, give more --steps or --time", refused.stderr.strip())
    # the time trained, to a tenth of a second under 10 s (a short run is not said to have trained for "0 s")
    elapsed = checkpoint_info(tmp_path / "short")["elapsed"]
    assert abs(float(re.search(r"after ([\d.]+) s", refused.stderr)[1]) - elapsed) <= (0.05 if elapsed < 10 else 0.5)
    again = cli("train", "--resume", "short", "--quiet")  # (rewrites best weights a kill left unwritten: see below)
    assert re.search(r"short stopped at step 40, after [\d.]+ s of training, at the end of its budget \(40 steps\): "
                     r"nothing to train", again.stderr) and checkpoint_step(tmp_path / "short") == 40
    # other settings would be ignored: refused, named
    for given, named in ((["train", "--lr", "0.5", "--eval-every=5"], "--eval-every, --lr"),
                         (["finetune", "tiny"], "the model tiny")):
        refused = cli(*given, "--resume", "short", "--steps", "50", check=False)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            "fournil: error: --resume goes on with the settings short started with (its config.json), a new budget "
            f"aside: only --steps, --time and --quiet go with it; drop {named}")
    # the new budget replaces the old: steps given to a run that had a time limit train that many steps
    cli(*ARGS, "--time", "2s", "--out", "timed")
    at = checkpoint_step(tmp_path / "timed")
    cli("train", "--resume", "timed", "--steps", str(at + 10), "--quiet")
    assert checkpoint_step(tmp_path / "timed") == at + 10


def test_the_best_weights_come_back_from_the_state_and_weights_without_a_state_are_not_trained_over(cli, tmp_path):
    cli(*ARGS, "--steps", "20", "--out", "run")
    run = tmp_path / "run"
    with safe_open(str(run / "train_state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["fournil"])["info"]["best_step"] == 20  # the last checkpoint was the best
    best = (run / "model.safetensors").read_bytes()
    # a kill between the state and the best weights, which come after it: resuming writes them from the state
    (run / "model.safetensors").unlink()
    cli("train", "--resume", run, "--quiet")
    assert (run / "model.safetensors").read_bytes() == best
    # weights without a state (deleted, or a converted model): refused, not trained again from the start over them
    (run / "train_state.safetensors").unlink()
    refused = cli("train", "--resume", run, "--steps", "40", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "has weights but no training state (train_state.safetensors) to go on from (an n-gram model is counted in one "
        "pass, a converted or downloaded model has none, a run whose state was deleted has lost it); start a new run "
        "instead, with --out")
    assert (run / "model.safetensors").read_bytes() == best
    refused = cli("train", "--resume", "nothere", check=False)
    assert refused.stderr.strip() == ("fournil: error: --resume nothere: no such run; give the folder of the run to "
                                      "continue (see `ls runs/`)")


def test_ctrl_c_saves_the_steps_done_and_says_how_to_continue(cli, tmp_path):
    proc = cli.popen(*ARGS, "--steps", "100000", "--eval-every", "1000", "--out", "stopped")
    run = tmp_path / "stopped"
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hung
        proc.kill()
        raise AssertionError(f"no exit 120 s after Ctrl-C; stderr:\n{proc.communicate()[1]}") from None
    assert proc.returncode == 130
    assert f"continue with: fournil train --resume {run.name}" in err
    assert checkpoint_step(run) >= 10  # no validation had come yet: the interrupt itself saved the state
