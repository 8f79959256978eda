"""Two processes with DistributedDataParallel (gloo on CPU) train exactly like one process on the same global batch."""
import json
import subprocess
import sys

import pytest
import torch

from fournil.errors import FournilError
from fournil.train.distributed import World

ARGS = ["train", "--data", "shakespeare", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--block-size", "32",
        "--steps", "20", "--eval-every", "10", "--quiet", "--device", "cpu", "--dtype", "float32"]


def records(run) -> dict:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def eval_test_nll(cli, run) -> float:
    row = next(line for line in cli("eval", run).stdout.splitlines() if line.startswith("test "))
    return float(row.split()[2])


def torchrun(tmp_path, *args):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fournil", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stdout and done.stdout.count("best val NLL") == 1  # rank 0 alone reports
    return done


def test_two_processes_match_one_process_of_the_same_global_batch(cli, tmp_path):
    """DDP (each process a whole replica) and FSDP (each process a shard of every weight) alike."""
    cli(*ARGS, "--batch-size", "8", "--out", "one")
    torchrun(tmp_path, *ARGS, "--batch-size", "4", "--out", "ddp")
    torchrun(tmp_path, *ARGS, "--batch-size", "4", "--fsdp", "--out", "fsdp")
    one = records(tmp_path / "one")
    assert one[20]["train_loss"] < one[10]["train_loss"]  # it did learn
    for name in ("ddp", "fsdp"):
        two = records(tmp_path / name)
        assert sorted(one) == sorted(two) == [10, 20]
        for step in one:
            assert abs(one[step]["train_loss"] - two[step]["train_loss"]) < 1e-5, name
            assert abs(one[step]["val_loss"] - two[step]["val_loss"]) < 1e-5, name
        # rank 0 wrote a complete run, the whole weights included
        assert abs(eval_test_nll(cli, name) - eval_test_nll(cli, "one")) < 1e-4, name


def test_more_processes_than_gpus_are_refused_with_what_to_run_instead():
    """torchrun --nproc_per_node=2 on a machine with one GPU: a clear error, not CUDA's 'invalid device ordinal'."""
    world = World(rank=1, size=2, local_rank=torch.cuda.device_count())
    with pytest.raises(FournilError, match=r"NCCL needs a GPU per process; use --nproc_per_node=\d+, or --device cpu"):
        world.device(torch.device("cuda"))
