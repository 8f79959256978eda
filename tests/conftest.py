"""Tests run the real command line in a temporary directory, on real files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: each takes its part, and so do its subprocesses
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


class CLI:
    def __init__(self, cwd: Path):
        self.cwd = cwd

    def __call__(self, *args, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, "-m", "fournil", *map(str, args)], cwd=self.cwd, env=env,
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"fournil {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
        return result

    def popen(self, *args) -> subprocess.Popen:
        # Ctrl-C reaches the child even when the tests themselves run in the background (where the shell ignores it)
        return subprocess.Popen([sys.executable, "-m", "fournil", *map(str, args)], cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cli(tmp_path) -> CLI:
    return CLI(tmp_path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Small runs of every model on the bundled English names, trained once for the whole session."""
    root = tmp_path_factory.mktemp("trained")
    cli = CLI(root)
    runs = {}
    for model, extra in {
        "ngram": [],
        "mlp": ["--steps", "60"],
        "rnn": ["--steps", "30", "--n-hidden", "64"],
        "gpt": ["--steps", "30", "--n-embd", "32", "--n-layer", "2"],
        "llama": ["--steps", "30", "--n-embd", "32", "--n-layer", "2"],
    }.items():
        out = root / f"names-{model}"
        cli("train", "--data", "names", "--model", model, "--out", out, "--quiet", "--eval-every", "20", *extra)
        runs[model] = out
    return runs


@pytest.fixture(scope="session")
def running_text(tmp_path_factory) -> Path:
    """A tiny gpt of Shakespeare with a context of 16 characters: text without an end, longer than its context."""
    root = tmp_path_factory.mktemp("running-text")
    CLI(root)("train", "--data", "shakespeare", "--model", "gpt", "--n-embd", "32", "--n-layer", "1", "--block-size",
              "16", "--steps", "10", "--eval-every", "10", "--quiet", "--out", "tiny")
    return root / "tiny"


@pytest.fixture(scope="session")
def bpe_llama(tmp_path_factory) -> Path:
    """A tiny llama of Shakespeare with a byte-level BPE (ChatML template, <|im_end|> ends a turn) and a context of
    1,024 tokens: a base to fine-tune, and a chat model to serve."""
    root = tmp_path_factory.mktemp("bpe-llama")
    CLI(root)("train", "--data", "shakespeare", "--model", "llama", "--tokenizer", "bpe:400", "--n-embd", "48",
              "--n-layer", "2", "--block-size", "1024", "--batch-size", "4", "--steps", "20", "--eval-every", "20",
              "--quiet", "--out", "chat")
    return root / "chat"
