"""Training that goes wrong stops with a clear message and loses nothing that was good."""
import json
import math

from conftest import losses

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
