"""Two processes with DistributedDataParallel (gloo on CPU) train exactly like one process on the same global batch."""
import json
import subprocess
import sys

ARGS = ["train", "--data", "shakespeare", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--block-size", "32",
        "--steps", "20", "--eval-every", "10", "--quiet", "--device", "cpu"]


def records(run) -> dict:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_match_one_process_of_the_same_global_batch(cli, tmp_path):
    cli(*ARGS, "--batch-size", "8", "--out", "one")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fournil", *ARGS, "--batch-size", "4", "--out", "two"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "in 2 processes" in two.stdout and two.stdout.count("best val NLL") == 1  # rank 0 alone reports
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(one) == sorted(two) == [10, 20]
    for step in one:
        assert abs(one[step]["train_loss"] - two[step]["train_loss"]) < 1e-5
        assert abs(one[step]["val_loss"] - two[step]["val_loss"]) < 1e-5
    assert one[20]["train_loss"] < one[10]["train_loss"]  # it did learn
    cli("eval", "two")  # rank 0 wrote a complete run
