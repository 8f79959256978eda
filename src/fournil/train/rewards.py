"""Rewards for reinforcement learning: a reward model trained by fournil, or a function of the answers' text.

A reward is called with the prompts (each a list of chat messages), the answers (text) and the data's reference
answers (text, or None where the data has none) and returns one number per answer. ``--reward`` names a reward-model
run, a built-in reward, or ``FILE.py:FUNCTION`` (your own function, given the references if it takes a third
argument). A reward that checks answers against references (``correct``: the final number, as GSM8K is scored) is
a verifiable reward, like the rule-based accuracy reward DeepSeek-R1 learnt to reason from.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import re
import reprlib
import traceback
from pathlib import Path

import torch

from fournil.checkpoint import read_safetensors
from fournil.data.instructions import InstructionData, pad_id, render_example
from fournil.data.preferences import final_answer
from fournil.device import autocast
from fournil.errors import FournilError
from fournil.models.reward import HEAD, RewardModel
from fournil.runs import Run, anchored, find_run
from fournil.train.objectives import evaluating


def brevity(prompts: list[list[dict]], answers: list[str], references=None) -> list[float]:
    """Fewer words score higher: -words / 50."""
    return [-len(a.split()) / 50 for a in answers]


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The number a text answers with: the first after GSM8K's ``####`` if it has one, else its last (``1,000`` and
    ``$1,000.00`` are 1000); None if it holds no number."""
    _, mark, tail = text.rpartition("####")
    found = NUMBER.findall(tail if mark else text)
    return float(found[0 if mark else -1].replace(",", "")) if found else None


def correct(prompts: list[list[dict]], answers: list[str], references: list[str]) -> list[float]:
    """1 for an answer whose final number is its reference answer's, else 0 (GSM8K's exact match)."""
    return [float(final_number(a) == final_number(r)) for a, r in zip(answers, references)]


def check_references(spec: str, splits: dict) -> None:
    """Refuse, before training, prompts that the reward ``spec`` cannot score: ``correct`` needs each prompt's reference
    answer, with a number in it (found at the step that drew the prompt, the run stopped there)."""
    if spec != "correct":
        return
    prompts = [(c, r) for part in splits.values() for c, r in zip(part.conversations, part.references)]
    wanting = [c for c, r in prompts if r is None or final_number(r) is None]
    if wanting:
        asked = next((m["content"] for m in wanting[0] if m["role"] == "user"), "")
        first = asked if len(asked) <= 60 else asked[:57] + "..."
        raise FournilError(f"--reward correct checks each answer's final number against the data's reference "
                           f"answer, and {len(wanting):,} of the {len(prompts):,} prompts come without one, or without "
                           f"a number in it (the first: {first!r}): give an instruction set of numeric answers "
                           f"(gsm8k_train, or a JSONL of question/answer records)")


BUILT_IN = {"brevity": brevity, "correct": correct}


def load_reward_model(spec, device: str = "auto", dtype: str = "auto") -> tuple[RewardModel, Run]:
    """A reward-model run: the reward model, and the run (its tokenizer, precision, configuration)."""
    run = Run.load(spec, device, dtype)
    return reward_model(run), run


def reward_model(run: Run) -> RewardModel:
    """The reward model of a loaded reward-model run: its language model with the trained head."""
    if not run.config.scores_answers:
        raise FournilError(f"{run.path} is not a reward model: train one with `fournil reward train`")
    head, _ = read_safetensors(run.path / HEAD)
    model = RewardModel(run.model)
    with torch.no_grad():
        model.score.weight.copy_(head["score.weight"])
    return model


class RewardModelScorer:
    """A reward model's score of each (prompt, answer), rendered with its chat template as in its training, in the
    precision of measurements (fp32 unless ``dtype`` says otherwise)."""

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        (self.model, self.run), self.batch_size = load_reward_model(spec, device, dtype), batch_size

    def __call__(self, prompts: list[list[dict]], answers: list[str], references=None) -> list[float]:
        tokenizer, model = self.run.tokenizer, self.model
        rendered = [final_answer(*render_example(tokenizer, p + [{"role": "assistant", "content": a}]))
                    for p, a in zip(prompts, answers)]
        data, scores = InstructionData(rendered, pad_id(tokenizer), "scored"), []
        with evaluating(model):
            for lo in range(0, len(rendered), self.batch_size):
                x, y = data._collate(list(range(lo, min(lo + self.batch_size, len(rendered)))))
                with autocast(model.device, self.run.measure_dtype):
                    scores += model(x.to(model.device), y.to(model.device)).float().tolist()
        return scores


def recorded(spec: str) -> str:
    """``spec`` as a run records it, to be found from any folder on ``--resume``: a built-in name as it is, the file
    of ``FILE.py:FUNCTION`` or a reward model's run as a whole path (:func:`fournil.runs.anchored`)."""
    if spec in BUILT_IN:
        return spec
    file, colon, name = spec.rpartition(":")
    return anchored(file) + colon + name if file.endswith(".py") else anchored(spec)


def load_reward(spec: str, device: str = "auto"):
    """The reward ``spec`` names: a built-in one, ``FILE.py:FUNCTION``, or a reward model's run directory."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    file, _, name = spec.rpartition(":")
    if file.endswith(".py"):
        if not Path(file).is_file():
            raise FournilError(f"--reward {spec}: no file {file}")
        module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise FournilError(f"--reward {spec}: {file} does not run: {said(e, file)}") from None
        if not callable(getattr(module, name, None)):
            raise FournilError(f"--reward {spec}: {file} defines no function {name!r}")
        return YourReward(getattr(module, name), spec)
    if spec.endswith(".py"):
        raise FournilError(f"--reward {spec}: name the function that scores the answers too: {spec}:FUNCTION")
    try:
        find_run(spec)  # a run's folder, or its name under runs/
    except FournilError:
        raise FournilError(f"--reward {spec}: no such reward: give a reward model's run (see `fournil reward train`), "
                           f"a built-in reward ({', '.join(BUILT_IN)}) or FILE.py:FUNCTION") from None
    return RewardModelScorer(spec, device)


CALLED = ("it is called with the prompts (each a list of chat messages), the answers (text) and, if it takes a third "
          "argument, the data's reference answers (text, or None), and returns one number per answer")


class YourReward:
    """A reward function of yours, checked at every call: one finite number per answer, and its errors said with the
    line of your file they come from (not a traceback through the training loop)."""

    def __init__(self, function, spec: str):
        self.function, self.spec = function, spec
        try:  # a third argument: the references
            inspect.signature(function).bind(None, None, None)
            self.references = True
        except (TypeError, ValueError):
            self.references = False

    def __call__(self, prompts: list[list[dict]], answers: list[str], references=None) -> list[float]:
        try:
            scores = self.function(prompts, answers, references) if self.references else self.function(prompts, answers)
        except Exception as e:
            raise FournilError(f"--reward {self.spec} failed: {said(e, self.spec.rpartition(':')[0])}; {CALLED}") from None
        if isinstance(scores, torch.Tensor):
            scores = scores.tolist()
        fine = isinstance(scores, (list, tuple)) and len(scores) == len(answers) and \
            all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)
        if not fine:
            raise FournilError(f"--reward {self.spec} returned {reprlib.repr(scores)} for {len(answers)} answers: "
                               f"{CALLED}, finite (not NaN nor infinite)")
        return [float(s) for s in scores]


def said(error: Exception, file: str) -> str:
    """An exception raised by your code, with the line of ``file`` it was raised from."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    lines = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == Path(file).resolve()]
    return f"{type(error).__name__}: {error}" + (f" ({file}, line {lines[-1].lineno})" if lines else "")
