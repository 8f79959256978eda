"""Learning from preferences: DPO, a reward model, and GRPO against a reward. Each is fine-tuning with another
objective and other data; this module builds those parts for :func:`fournil.train.finetune.finetune`."""
from __future__ import annotations

import contextlib
import copy

from fournil.checkpoint import save_tensors
from fournil.config import RunConfig
from fournil.data.preferences import load_preferences, load_prompts
from fournil.device import model_width, pick_dtype
from fournil.errors import FournilError
from fournil.formats.peft import save_adapter
from fournil.models.base import packed_width, shares_prompts
from fournil.models.lora import lora_disabled, lora_state
from fournil.models.reward import HEAD, RewardModel
from fournil.runs import WEIGHTS
from fournil.train.grpo import GRPO, Rollouts
from fournil.train.objectives import DPO, PairwiseReward, evaluating, reference_scores, token_logprobs
from fournil.train.rewards import check_references, load_reward, reward_model

DEFAULT_LR = {"dpo": (5e-4, 5e-6), "reward": (1e-3, 1e-5), "grpo": (2e-4, 2e-6)}  # (LoRA, every weight)


def load_alignment_data(config: RunConfig, tokenizer, announce=print) -> dict:
    """Preference pairs (dpo, reward) or prompts (grpo), split as the run splits them."""
    d, align, max_length = config.data, config.align, config.finetune.max_length
    if align.method == "grpo":
        return load_prompts(d.data, tokenizer, max_length - align.max_new_tokens, d.split, d.seed, announce)
    return load_preferences(d.data, tokenizer, max_length, d.split, d.seed, announce)


def reference(model, copy_model: bool):
    """The reference model's per-token log-probabilities: a frozen copy of the base, taken now (before training); or
    the model itself with any LoRA adapter left out (no memory), which is the base while the adapter trains, and
    before training starts when the reference is precomputed."""
    frozen = copy.deepcopy(model).requires_grad_(False) if copy_model else None

    def logprobs(x, y, **inputs):
        ref = model if frozen is None else frozen
        with evaluating(ref), lora_disabled(model) if frozen is None else contextlib.nullcontext():
            return token_logprobs(ref, x, y, **inputs)

    return logprobs


def pair_width(model) -> int | None:
    """The rows into which DPO's pairs and GRPO's answers are packed, each prompt read once (None: not packed)."""
    return packed_width(model) if shares_prompts(model) else None


def alignment(config: RunConfig, model, tokenizer, splits: dict, run_dir, ref, announce=print):
    """The model to train, its objective, its data and how its best weights are kept, for ``config.align``."""
    align, lora, base = config.align, config.finetune.lora, config.finetune.base
    device = model.device
    dtype = pick_dtype(device, config.train.dtype, width=model_width(model))
    measure = pick_dtype(device, config.train.dtype, measure=True)
    beta = align.beta
    if align.method == "reward":
        reward_model = RewardModel(model)

        def keep(weights):
            if lora:
                save_adapter(model, lora, run_dir, base)
            else:
                save_tensors({k.removeprefix("lm."): v for k, v in weights.items() if k.startswith("lm.")}, run_dir / WEIGHTS)
            save_tensors({"score.weight": reward_model.score.weight}, run_dir / HEAD)

        return reward_model, PairwiseReward(), splits, keep
    keep = (lambda _: save_adapter(model, lora, run_dir, base)) if lora else None
    if align.method == "dpo":
        if align.reference == "precomputed":
            announce("computing the reference model's log-probabilities of every answer, once")
            for part in splits.values():
                part.ref = reference_scores(ref, part, device, dtype, pack_to=pair_width(model))
            ref = None
        return model, DPO(beta, ref, pair_width(model)), splits, keep
    reward = load_reward(align.reward, config.train.device)
    check_references(align.reward, splits)
    if note := answers_cut(splits["train"], tokenizer, align.max_new_tokens):
        announce(note)
    rollouts = {name: Rollouts(part, model, tokenizer, reward, align, dtype if name == "train" else measure)
                for name, part in splits.items()}
    if config.train.batch_size % align.group:
        raise FournilError(f"--batch-size {config.train.batch_size} must be a multiple of --group {align.group} "
                           f"(each prompt's answers are compared with each other)")
    return model, GRPO(beta, ref, pair_width(model)), rollouts, keep


def answers_cut(prompts, tokenizer, limit: int, sample: int = 1000) -> str | None:
    """A note when ``--max-new-tokens`` is shorter than half the data's reference answers (of up to ``sample`` of
    them, evenly spaced): an answer cut before its end (GSM8K's final number) scores as a wrong one, and a group of
    answers that all score alike has nothing to teach. GSM8K's answers: a median of 110 SmolLM2 tokens, and 200 for
    9 in 10; the default is 64."""
    given = [r for r in prompts.references if r is not None]
    lengths = sorted(len(tokenizer.encode(r)) for r in given[::max(1, len(given) // sample)])
    if not lengths or lengths[len(lengths) // 2] <= limit:
        return None
    return (f"note: half the data's reference answers are longer than {lengths[len(lengths) // 2]} tokens, and "
            f"--max-new-tokens {limit} cuts sampled answers sooner (cut before its end, an answer scores as a wrong "
            f"one): --max-new-tokens {lengths[int(0.9 * (len(lengths) - 1))]} lets 9 in 10 of them end")


def evaluate_alignment(run, names=("val", "test")) -> dict[str, dict]:
    """A run's scores on held-out data, by its method: DPO's reward accuracy and margins against its base model, a
    reward model's accuracy on pairs, GRPO's mean reward and KL divergence from its base. The base of a LoRA run
    loaded with its adapter apart (``Run.load(..., merge=False)``) is that model with the adapter left out; otherwise
    it is loaded again."""
    from fournil.runs import Run

    config, data, tokenizer = run.config, run.data(), run.tokenizer
    align, model = config.align, run.model
    beta = align.beta
    if align.method == "reward":
        model, objective = reward_model(run), PairwiseReward()
    else:
        apart = bool(lora_state(model))
        ref = reference(model if apart else Run.load(config.finetune.base, config.train.device).model, copy_model=False)
        width = pair_width(model)
        objective = DPO(beta, ref, width) if align.method == "dpo" else GRPO(beta, ref, width)
        if align.method == "grpo":
            reward = load_reward(align.reward, config.train.device)
            data = {n: Rollouts(data[n], model, tokenizer, reward, align, run.measure_dtype) for n in names}
    return {n: objective.validate(model, data[n], tokenizer, run.measure_dtype, None) for n in names}
