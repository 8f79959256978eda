"""Learning from preferences: the DPO loss by hand, DPO and a reward model learning a synthetic preference, GRPO
raising a reward with its KL held by the penalty, and clear errors."""
import functools
import itertools
import json
import math
import re

import pytest
import torch
from conftest import CLI, InProcess, write_jsonl
from torch import nn

from fournil.config import AlignConfig
from fournil.data.batches import IGNORE, PREFIX, SHARED, pack, prompt_groups
from fournil.data.instructions import BUNDLED_INSTRUCTIONS, data_path
from fournil.data.preferences import load_preferences, load_prompts, prompt_messages, read_pairs, read_prompts
from fournil.errors import FournilError
from fournil.evaluate.bench import report
from fournil.models.base import target_logprobs
from fournil.runs import Run
from fournil.train.align import evaluate_alignment, reference
from fournil.train.grpo import GRPO, Rollouts
from fournil.models import build_model
from fournil.models.reward import RewardModel
from fournil.train.objectives import DPO, PairwiseReward, mean_over_batches, pair_logprobs, token_logprobs
from fournil.train.rewards import load_reward


class FixedNext(nn.Module):
    """A model whose next token, after any token, is 0, 1 or 2 with probabilities 0.5, 0.3, 0.2 (or those given)."""

    def __init__(self, probs=(0.5, 0.3, 0.2)):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def forward(self, x, targets=None):
        logits = self.logits.expand(*x.shape, len(self.logits))
        return logits if targets is None else target_logprobs(nn.Identity(), logits, targets)


def test_dpo_loss_is_the_hand_computed_value():
    # one pair: after token 0, chosen answer "1" (policy 0.3, reference 0.25), rejected "2" (policy 0.2, reference 0.25)
    x, y = torch.tensor([[[0], [0]]]), torch.tensor([[[1], [2]]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    policy = FixedNext()
    # -log sigmoid(0.1 * (log(0.3 / 0.25) - log(0.2 / 0.25))) = log(1 + exp(-0.1 * log 1.5))
    loss, metrics = DPO(0.1).loss(policy, (x, y, ref))
    assert loss.item() == pytest.approx(0.6730794, abs=1e-6)
    assert metrics["reward_accuracy"] == 1.0 and metrics["margin"].item() == pytest.approx(0.1 * math.log(1.5), abs=1e-6)
    # the same with the reference computed by a reference model instead of carried by the batch
    reference_model = FixedNext((0.5, 0.25, 0.25))
    on_the_fly, _ = DPO(0.1, lambda x, y: token_logprobs(reference_model, x, y)).loss(policy, (x, y))
    assert on_the_fly.item() == pytest.approx(0.6730794, abs=1e-6)
    loss.backward()  # a step raises the chosen answer's probability and lowers the rejected one's
    assert policy.logits.grad[1] < 0 < policy.logits.grad[2]


@pytest.fixture(scope="module")
def preferences(bpe_llama, tmp_path_factory):
    """A synthetic preference: whatever the question, "blue sky" is chosen over "red fire"."""
    root = tmp_path_factory.mktemp("align")
    rows = [{"prompt": f"Question {i}: which colour?", "chosen": "blue sky", "rejected": "red fire"} for i in range(40)]
    return root, bpe_llama, write_jsonl(root / "colours.jsonl", rows)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def draws(objective, run_dir) -> bool:
    """Whether the run's last record has the train and val figures its loss.png draws (it drew a reward model's and
    GRPO's losses as "nats per token", and distillation's mixed objective beside a val NLL)."""
    return all(key in records(run_dir)[-1] for key in objective.curves[:2])


def test_dpo_grows_the_chosen_margin_and_a_precomputed_reference_trains_the_same(preferences):
    root, base, data = preferences
    CLI(root)("align", base, "--data", data, "--lora", "--steps", "30", "--eval-every", "10", "--lr", "1e-2", "--quiet",
              "--out", "dpo")
    vals = [r for r in records(root / "dpo") if "val_loss" in r]
    assert draws(DPO, root / "dpo")
    assert vals[0]["val_margin"] < vals[-1]["val_margin"] and vals[-1]["val_reward_accuracy"] == 1.0
    assert vals[-1]["val_chosen_reward"] > 0 > vals[-1]["val_rejected_reward"]
    shown = (root / "dpo" / "samples.txt").read_text().splitlines()  # the question answered, and the answer
    assert shown and all(re.match(r"'Question \d+: which colour\?' -> '", line) for line in shown), shown
    # the tuned model itself prefers the chosen answer far more than its base did
    tuned, before = Run.load(root / "dpo", "cpu"), Run.load(base, "cpu")
    pair = tuned.data()["test"]
    x, y = (t.flatten(0, 1) for t in next(pair.batches(4)))
    gap = {name: token_logprobs(run.model, x, y).sum(-1).view(-1, 2).diff(dim=1).neg().mean().item()
           for name, run in (("tuned", tuned), ("base", before))}
    assert gap["tuned"] > gap["base"] + 5
    result = CLI(root)("eval", root / "dpo")
    assert "test: loss" in result.stdout and "reward accuracy 1.0000" in result.stdout
    adapter = sum(p.numel() for name, p in Run.load(root / "dpo", "cpu", merge=False).model.named_parameters()
                  if ".lora_" in name)
    assert f"llama, {before.model.num_params():,} parameters and a LoRA adapter of {adapter:,};" in result.stdout
    beside = CLI(root)("eval", base, root / "dpo", check=False)  # (in a table of NLLs, its scores would mislead)
    assert beside.returncode == 2 and f"{root / 'dpo'} was tuned on preferences: its scores are its method's, not " \
                                      f"NLLs; `fournil eval {root / 'dpo'}` alone gives them" in beside.stderr
    # on the answers of instructions, it is a language model like the others: the chosen answer is likelier now
    asked = write_jsonl(root / "asked.jsonl", [{"prompt": f"Question {i}: which colour?", "completion": "blue sky"}
                                               for i in range(50, 56)])
    table = CLI(root)("eval", base, root / "dpo", "--data", asked).stdout
    nll = dict(re.findall(r"^(\S+)\s+llama\s+[\d,]+\s+[\d,]+\s+([\d.]+)", table, re.M))
    assert float(nll[str(root / "dpo")]) < float(nll[str(base)]) - 0.1, table
    # eval keeps the adapter apart, and the model without it is the reference: the figures of the adapter folded in
    # against the base loaded again
    folded = evaluate_alignment(tuned)
    for name, scores in folded.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name}: "))
        shown = dict(part.rsplit(" ", 1) for part in line.removeprefix(f"{name}: ").split(", "))
        assert {k: float(v) for k, v in shown.items()} == \
            pytest.approx({k.replace("_", " "): v for k, v in scores.items()}, abs=1e-4), name
    # every weight trains, against a frozen copy of the base or against its log-probabilities computed once
    for how in ("model", "precomputed"):
        CLI(root)("align", base, "--data", data, "--reference", how, "--steps", "4", "--eval-every", "2", "--quiet",
                  "--dtype", "float32", "--out", f"full-{how}")  # (in bf16 the two differ by its rounding)
    kept, precomputed = records(root / "full-model"), records(root / "full-precomputed")
    assert [r["train_loss"] for r in kept] == pytest.approx([r["train_loss"] for r in precomputed], abs=1e-5)
    assert kept[-1]["val_margin"] == pytest.approx(precomputed[-1]["val_margin"], abs=1e-5)


def test_dpo_scores_held_out_pairs_under_its_reference_once_and_as_it_did_each_time(preferences):
    """The reference never changes: the first validation keeps its scores of the held-out pairs, the next ones read
    them. A validation's figures are those of scoring the reference anew in every batch, as before."""
    root, base, data = preferences
    policy, tokenizer = Run.load(base, "cpu").model, Run.load(base, "cpu").tokenizer
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from its base
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scored, calls = reference(Run.load(base, "cpu").model, copy_model=False), []

    def counted(x, y):
        calls.append(len(x))
        return scored(x, y)

    for max_tokens in (None, 60):  # every pair (36: three batches), then the first ones to 60 answer tokens
        pairs = load_preferences(str(data), tokenizer, 64)["train"]
        answers = itertools.accumulate(int(y.ne(IGNORE).sum()) for _, y in (pairs.answers._collate([i]) for i in
                                                                             range(2 * len(pairs))))
        first_ones = next(i // 2 + 1 for i, seen in enumerate(answers) if i % 2 and seen >= 60)
        objective, calls[:] = DPO(0.1, counted), []
        first = objective.validate(policy, pairs, tokenizer, torch.float32, max_tokens)
        validated = sum(len(batch[0]) for batch in pairs.batches(16, max_tokens))
        assert sum(calls) == 2 * len(pairs.ref) and len(pairs.ref) == validated == \
            (36 if max_tokens is None else first_ones) and 2 < first_ones < 8
        assert objective.validate(policy, pairs, tokenizer, torch.float32, max_tokens) == first and sum(calls) == \
            2 * len(pairs.ref)  # read, not scored again
        anew = mean_over_batches(DPO(0.1, scored), policy, load_preferences(str(data), tokenizer, 64)["train"],
                                 torch.float32, max_tokens)
        assert first == pytest.approx(anew, rel=1e-6) and abs(first["margin"]) > 1e-3


def test_a_reward_model_learns_the_preference_and_scores_answers(preferences):
    root, base, data = preferences
    CLI(root)("reward", "train", base, "--data", data, "--steps", "20", "--eval-every", "10", "--lr", "3e-3", "--quiet",
              "--out", "rm")
    assert {p.name for p in (root / "rm").iterdir()} >= {"model.safetensors", "reward_head.safetensors", "config.json"}
    assert draws(PairwiseReward, root / "rm") and PairwiseReward.curves.measure == "Bradley-Terry loss (nats per pair)"
    assert CLI(root)("info", root / "rm").stdout.splitlines()[0].endswith("; a reward model: a score head on it rates "
                                                                         "answers")  # (it said only "llama")
    result = CLI(root)("reward", "score", root / "rm")
    assert "test: 2 pairs, chosen scored higher in 100.0 %" in result.stdout
    result = CLI(root)("reward", "score", root / "rm", "--data", data)
    assert "colours.jsonl: 40 pairs, chosen scored higher in 100.0 %" in result.stdout
    for length in ("3", "0"):  # (0 was taken for no length given)
        result = CLI(root)("reward", "score", root / "rm", "--data", data, "--max-length", length, check=False)
        assert f"skipped 40 of 40 examples longer than {length} tokens" in result.stdout
        assert "has no pair to score" in result.stderr
    result = CLI(root)("reward", "score", root / "rm", "--prompt", "Question 99: which colour?",
                       "--answer", "blue sky", "--answer", "red fire")
    (blue, _), (red, _) = (line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert float(blue) > float(red)
    # the reward as GRPO calls it: the same scores
    scores = load_reward(str(root / "rm"), "cpu")([[{"role": "user", "content": "Question 99: which colour?"}]] * 2,
                                                  ["blue sky", "red fire"])
    assert scores == pytest.approx([float(blue), float(red)], abs=1e-3)
    for command in (["convert", root / "rm", root / "rm.gguf"], ["merge", base, root / "rm", root / "merged"]):
        refused = CLI(root)(*command, check=False)  # (its body alone was written, a model that neither writes nor scores)
        assert refused.returncode == 2 and "rm is a reward model" in refused.stderr, refused.stderr
        assert "would neither write nor score; use the run itself (fournil reward score" in refused.stderr
        assert not (root / "rm.gguf").exists() and not (root / "merged").exists()
    for command in (["generate", root / "rm", "Question 99:"], ["sample", root / "rm"],  # garbage before: refused
                    ["explain", root / "rm", "Question 99:"],
                    ["distill", "--teacher", root / "rm", "--data", data, "--steps", "1", "--out", "d"],
                    ["distill", "--teacher", base, "--student", root / "rm", "--steps", "1", "--out", "d"],
                    # (and as a base to tune, its body trained with a head that no longer fits it)
                    ["finetune", root / "rm", "--steps", "1", "--out", "d"], ["align", root / "rm", "--data", data,
                                                                              "--steps", "1", "--out", "d"]):
        refused = CLI(root)(*command, check=False)
        assert refused.returncode == 2 and f"{root / 'rm'} is a reward model: it scores answers" in refused.stderr
        assert f"does not write them; use the model it was trained from, {base}" in refused.stderr


REWARD = '''
def vowels(prompts, answers):
    """The share of an answer's characters that are vowels."""
    return [sum(c in "aeiou" for c in a) / max(1, len(a)) for a in answers]
'''


WRONG_REWARDS = '''
def text(prompts, answers):
    return "high"

def nan(prompts, answers):
    return [float("nan")] * len(answers)

def boom(prompts, answers):
    raise ValueError("no answer")
'''


def test_grpo_raises_the_reward_and_the_kl_penalty_holds_the_policy_near_its_base(preferences):
    root, base, data = preferences
    (root / "rewards.py").write_text(REWARD, encoding="utf-8")
    shakespeare_prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Speak of thing {i}"} for i in range(200)])
    before = Run.load(base, "cpu")
    prompts = load_prompts(str(shakespeare_prompts), before.tokenizer, 400, announce=lambda _: None)
    align = AlignConfig(method="grpo", max_new_tokens=16)
    reward = load_reward(f"{root / 'rewards.py'}:vowels")
    rollouts = Rollouts(prompts["train"], before.model, before.tokenizer, reward, align, torch.float32)
    x, y, advantages, rewards = rollouts.sample(8, torch.Generator().manual_seed(0))
    groups, r = advantages.view(2, 4), rewards.view(2, 4)
    assert groups.mean(1).abs().max() < 1e-5 and torch.allclose(groups, (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4))
    answers = [before.tokenizer.decode([t for t in row.tolist() if t != IGNORE]) for row in y]
    assert rewards.tolist() == pytest.approx(reward(None, [a.removesuffix("<|im_end|>") for a in answers]), abs=1e-6)
    score = GRPO(0.04, reference(before.model, copy_model=False))
    start = score.validate(before.model, Rollouts(prompts["val"], before.model, before.tokenizer, reward, align,
                                                  torch.float32), before.tokenizer, torch.float32, None)
    assert start["kl"] == pytest.approx(0.0, abs=1e-6)  # the base is its own reference

    def mean_reward(model) -> float:  # of 4 answers to each held-out prompt: 40, where validation draws 10
        val = Rollouts(prompts["val"], model, before.tokenizer, reward, align, torch.float32)
        return float(val.rollout(list(range(len(val))), 4, seed=0)[2].mean())

    finals = {}
    for beta in ("0.04", "1.0"):
        CLI(root)("align", base, "--method", "grpo", "--data", shakespeare_prompts, "--reward",
                  f"{root / 'rewards.py'}:vowels", "--max-new-tokens", "16", "--beta", beta, "--steps", "30",
                  "--batch-size", "16", "--eval-every", "30", "--lr", "5e-3", "--quiet", "--out", f"grpo-{beta}")
        finals[beta] = records(root / f"grpo-{beta}")[-1]
    assert (root / "grpo-1.0" / "samples.txt").read_text().startswith("'Speak of thing ")
    assert draws(GRPO, root / "grpo-1.0") and GRPO.curves[:2] == ("train_reward", "val_reward")
    assert mean_reward(Run.load(root / "grpo-0.04", "cpu").model) > mean_reward(before.model) + 0.05
    assert 0 < finals["1.0"]["val_kl"] < finals["0.04"]["val_kl"] < 1.0


REFERENCED = '''
def checked(prompts, answers, references):
    """1 where the reference is the one the data gives this prompt ("Sum 7 and 0?": "7 + 0 = 7 #### 7")."""
    n = [p[-1]["content"].split()[1] for p in prompts]
    return [float(r == f"{i} + 0 = {i}\\n#### {i}") for i, r in zip(n, references)]
'''


def test_grpo_rewards_get_each_prompts_reference_answer_and_correct_checks_its_final_number(preferences):
    """Verifiable rewards (as DeepSeek-R1's accuracy reward): a reward function of three arguments gets each prompt's
    reference answer from the data, in training and validation; the built-in `correct` scores an answer 1 where its
    final number is the reference's (after GSM8K's ####), and refuses prompts that come without a reference."""
    from fournil.train.rewards import correct

    root, base, colours = preferences
    (root / "checked.py").write_text(REFERENCED, encoding="utf-8")
    sums = write_jsonl(root / "sums.jsonl", [{"question": f"Sum {i} and 0?", "answer": f"{i} + 0 = {i}\n#### {i}"}
                                             for i in range(40)])
    common = ("--method", "grpo", "--data", sums, "--max-new-tokens", "4", "--steps", "2", "--batch-size", "4",
              "--eval-every", "2", "--quiet")
    said = CLI(root)("align", base, *common, "--reward", f"{root / 'checked.py'}:checked", "--out", "checked").stdout
    logged = records(root / "checked")
    median = sorted(len(Run.load(base, "cpu").tokenizer.encode(f"{i} + 0 = {i}\n#### {i}")) for i in range(40))[20]
    assert f"note: half the data's reference answers are longer than {median} tokens, and --max-new-tokens 4 cuts " \
        "sampled answers sooner" in said
    assert {r["train_reward"] for r in logged if "train_reward" in r} == {1.0} and logged[-1]["val_reward"] == 1.0
    said = CLI(root)("align", base, *common[:5], str(median), *common[6:], "--reward", "correct", "--out", "correct")
    assert 0 <= records(root / "correct")[-1]["val_reward"] <= 1 and "note:" not in said.stdout
    card = report("correct", {"results": {}}, Run.load(root / "correct", "cpu"))  # (a bench's report card)
    assert f"{root / 'correct'}: trained by GRPO against the reward correct; llama" in card  # (said: "aligned on")

    gsm8k, dollars, negative = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "It costs $1,000.", "#### -3.5"
    scored = {(gsm8k, "72"): 1, (gsm8k, "She sold 24, so 72 in all."): 1, (gsm8k, "#### 72"): 1, (gsm8k, "24"): 0,
              (dollars, "1000 dollars"): 1, (dollars, "$1,000.00"): 1, (dollars, "1,001"): 0, (dollars, "none"): 0,
              (negative, "-3.50"): 1, (negative, "3.5"): 0, (negative, "-3.5 or 4"): 0}
    assert correct([None] * len(scored), [a for _, a in scored], [r for r, _ in scored]) == list(scored.values())
    refused = CLI(root)("align", base, *common[:2], "--data", colours, *common[4:], "--reward", "correct", "--out",
                        "none", check=False)
    assert refused.returncode == 2 and "--reward correct checks each answer's final number against the data's " \
        "reference answer, and 40 of the 40 prompts come without one" in refused.stderr and "Traceback" not in \
        refused.stderr and not (root / "none").exists()
    wordy = write_jsonl(root / "wordy.jsonl", [{"question": f"Sum {i} and 0?", "answer": f"{i}"} for i in range(39)]
                        + [{"question": "Your name?", "answer": "Ada"}])  # (found only at the step that drew it)
    refused = CLI(root)("align", base, *common[:2], "--data", wordy, *common[4:], "--reward", "correct", "--out",
                        "none", check=False)
    assert refused.returncode == 2 and "1 of the 40 prompts come without one, or without a number in it (the " \
        "first: 'Your name?')" in refused.stderr and not (root / "none").exists()


def test_preference_files_in_each_usual_form_read_as_the_same_pairs(tmp_path):
    asked = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "By hand?"},
             {"role": "user", "content": "Yes."}]
    good, bad = "Knead flour, water, yeast and salt; let it rise; bake.", "No."

    def answer(text):
        return [{"role": "assistant", "content": text}]

    said = "\n\nHuman: How do I bake bread?\n\nAssistant: By hand?\n\nHuman: Yes.\n\nAssistant: "
    forms = {
        "explicit": {"prompt": asked, "chosen": good, "rejected": bad},
        "explicit, chat": {"prompt": asked, "chosen": answer(good), "rejected": answer(bad)},
        "implicit, chat (TRL)": {"chosen": asked + answer(good), "rejected": asked + answer(bad)},
        "implicit, transcripts (Anthropic's hh-rlhf files)": {"chosen": said + good, "rejected": said + bad},
    }
    for name, record in forms.items():
        path = write_jsonl(tmp_path / "pairs.jsonl", [record])
        assert read_pairs(str(path)) == [(asked + answer(good), asked + answer(bad))], name
        assert read_prompts(str(path)) == [(asked, None)], name  # (GRPO's prompts; it said "missing 'instruction'")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([forms["implicit, chat (TRL)"]] * 2), tmp_path / "pairs.parquet")
    assert read_pairs(str(tmp_path / "pairs.parquet")) == [(asked + answer(good), asked + answer(bad))] * 2

    wrong = {
        "without a 'prompt', 'chosen' and 'rejected' must be the same conversation up to their last answer":
            {"chosen": said + good, "rejected": said.replace("Yes", "No") + bad},
        r"without a 'prompt', 'chosen' must be the whole conversation: a list of chat messages, or a transcript":
            {"chosen": good, "rejected": bad},
        "'chosen' and 'rejected' must each end with an assistant answer": {"chosen": asked, "rejected": asked},
        r"'rejected' must be a list of \{'role'": {"prompt": "Hi", "chosen": "Hello", "rejected": 3},
    }
    for message, record in wrong.items():
        with pytest.raises(FournilError, match=f"pairs.jsonl, line 1: {message}"):
            read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", [record])))


def test_preference_data_and_alignment_settings_say_what_is_wrong(preferences, tmp_path, capsys, monkeypatch):
    root, base, data = preferences
    assert prompt_messages("Human: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:", "x") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"}]
    chosen, rejected = read_pairs("hh_rlhf_harmless")[0]
    assert chosen[:-1] == rejected[:-1] and chosen[-2]["role"] == "user" and chosen[-1]["role"] == "assistant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', encoding="utf-8")
    with pytest.raises(FournilError, match="line 2: not valid JSON"):
        read_pairs(str(bad))
    write_jsonl(bad, [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(FournilError, match=r"line 1: a preference record has .*\(missing rejected\)$"):
        read_pairs(str(bad))
    with pytest.raises(FournilError, match=r"missing chosen, rejected\); this file holds conversations: learn "
                                           r"from them with fournil finetune"):
        read_pairs(str(data_path("fr_oasst1_chat", BUNDLED_INSTRUCTIONS, "instruction")))
    write_jsonl(bad, [{"prompt": "Human: hi\n\nAssistant: hello", "chosen": "b", "rejected": "c"}])
    with pytest.raises(FournilError, match="must end with a Human turn"):
        read_pairs(str(bad))
    (tmp_path / "wrong.py").write_text(WRONG_REWARDS, encoding="utf-8")
    (tmp_path / "broken.py").write_text("def f(prompts, answers)\n    return []\n", encoding="utf-8")
    same = write_jsonl(tmp_path / "same.jsonl",
                       [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "yes"} for i in range(5)])
    grpo = ("align", base, "--method", "grpo", "--max-new-tokens", "4", "--data", data, "--reward")
    cli = InProcess(capsys, monkeypatch, root)  # fournil's entry point in this process: no start-up for each
    failures = {
        (*grpo, f"{tmp_path / 'wrong.py'}:text"): "wrong.py:text returned 'high' for 8 answers",
        (*grpo, f"{tmp_path / 'wrong.py'}:nan"): "returns one number per answer, finite (not NaN nor infinite)",
        (*grpo, f"{tmp_path / 'wrong.py'}:boom"):
            f"wrong.py:boom failed: ValueError: no answer ({tmp_path / 'wrong.py'}, line 9)",
        (*grpo, f"{tmp_path / 'broken.py'}:f"): "broken.py does not run: SyntaxError: ",
        ("align", base, "--data", same): "has 0 usable examples",
        ("finetune", "--resume", base): f"is a run of fournil train: continue it with `fournil train --resume {base}`",
        ("align", base, "--method", "grpo"): "grpo needs a reward",
        ("align", base, "--beta", "0"): "--beta 0 leaves DPO nothing to learn (its loss is log 2 whatever the model",
        ("align", base, "--method", "grpo", "--reward", "brevity", "--batch-size", "6"): "must be a multiple of --group 4",
        ("align", base, "--method", "grpo", "--reward", "nowhere.py:f"): "no file nowhere.py",
        ("align", base, "--method", "grpo", "--reward", "helpful"):  # (it was said to be no model)
            "--reward helpful: no such reward: give a reward model's run (see `fournil reward train`), a built-in",
        ("align", base, "--method", "grpo", "--reward", "rewards.py"): "name the function that scores the answers too",
        ("align", base, "--data", "nothing.jsonl"): "no preference set or file named 'nothing.jsonl'",
        ("align", base, "--data", "rasbt_preference"): "'rasbt_preference' (did you mean rasbt_preferences?)",
        ("align", base, "--reward", "brevity", "--group", "8"):  # (DPO trained, without them)
            "--reward, --group are GRPO's: add --method grpo to learn from sampled answers' rewards, or leave them out",
        ("align", base, "--method", "grpo", "--reward", "brevity", "--reference", "precomputed"):
            "--reference precomputed is DPO's: leave it out for grpo",
        ("reward", "score", base): "is not a reward model",
        ("reward", "score", base, "--data", data, "--prompt", "Q", "--answer", "A"):  # (--data was left unread)
            "--data scores preference pairs, --prompt and --answer the answers given: choose one",
        ("reward", "score", base, "--max-length", "64"): "--max-length skips the pairs of --data that are longer",
        ("align", base, "--data", "rasbt_instructions"):
            "the bundled rasbt_instructions holds instructions, not preference examples: learn from it with fournil "
            "finetune",
    }
    said = {}
    for args, message in failures.items():
        result = cli(*args, "--steps", "1", "--out", tmp_path / "never", check=False) if args[0] == "align" else \
            cli(*args, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        # a refused run, or one that failed before its first checkpoint, leaves no folder that would block the next try
        assert not (tmp_path / "never").exists(), args
        said[args[-1]] = result.stdout
    assert "skipped 5 of 5 pairs whose chosen and rejected answers are the same" in said[same]
    from fournil.models import build_model
    from fournil.models.reward import RewardModel

    with pytest.raises(FournilError, match=r"^a reward model is a Transformer's body \(gpt, llama\) with a score head; "
                                           r"this model is mlp$"):  # (its layer named hidden read the token ids)
        RewardModel(build_model({"family": "mlp", "vocab_size": 10, "block_size": 4}))


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_a_prompt_read_once_gives_each_answer_the_log_probability_and_reward_of_its_own_row(family):
    # pairs of several shapes, padded as a batch pads them: prompts of 2 to 6 tokens, answers of 1 to 7, a pair whose
    # rows differ before their answers (an earlier turn), and rows longer together than the model's context of 16
    torch.manual_seed(0)
    model = build_model({"family": family, "vocab_size": 30, "block_size": 16, "n_layer": 2, "n_head": 2,
                         "n_embd": 16}).eval()
    shapes = [(2, 1, 7), (6, 3, 3), (4, 7, 2), (3, 5, 5), (6, 7, 7)]  # prompt, chosen, rejected
    T = max(p + max(c, r) for p, c, r in shapes)
    x, y = torch.zeros(len(shapes), 2, T, dtype=torch.long), torch.full((len(shapes), 2, T), IGNORE)
    for i, (p, c, r) in enumerate(shapes):
        prompt = torch.cat([torch.tensor([7]), torch.randint(1, 30, (p - 1,))])  # all begin alike (a system prompt)
        for j, n in enumerate((c, r)):
            seq = torch.cat([prompt, torch.randint(1, 30, (n + 1,))])
            x[i, j, : p + n], y[i, j, p - 1 : p + n] = seq[: p + n], seq[p : p + n + 1]
    x[3, 1, 1] = 29 if x[3, 0, 1] != 29 else 28  # the fourth pair's rows differ at their second token
    xs, sees, ys, owner = pack(x.flatten(0, 1), y.flatten(0, 1), 32, share=True, sizes=[2] * len(shapes))
    # pairs of 10 to 20 tokens after the first (the last: its prompt but the first token and the token that predicts
    # each answer's first, 4, then 8 targets each), three rows of 32 hold them; each row's first token is shared
    assert xs.shape == (3, 31) and (xs[:, 0] == 7).all() and (owner[:, 0] == SHARED).all()
    assert sorted(ys[ys != IGNORE].tolist()) == sorted(y[y != IGNORE].tolist())  # every target once
    # a pair's prompt after the first token, once (0, 4, 2, 0 and 4 tokens: the fourth's rows differ at the second)
    assert int((owner == PREFIX).sum()) == 10 and int(((owner == 6) | (owner == 7)).sum()) == 2 * (3 + 5 - 1)
    logprobs = functools.partial(token_logprobs, model)
    with torch.no_grad():
        apart, shared = pair_logprobs(logprobs, x, y, None), pair_logprobs(logprobs, x, y, 32)
    torch.testing.assert_close(shared, apart, rtol=0, atol=1e-5)  # fp32: the same sums, in another order
    assert apart.shape == (5, 2) and (apart < 0).all()
    # a reward model reads each answer's score at its last target, in the shared row as in the answer's own
    scorer = RewardModel(model)
    nn.init.normal_(scorer.score.weight)
    with torch.no_grad():
        one_by_one, pairs = scorer(x.flatten(0, 1), y.flatten(0, 1)).view(-1, 2), scorer(x, y)
    torch.testing.assert_close(pairs, one_by_one, rtol=1e-5, atol=1e-5)
    assert one_by_one.std() > 0.1


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_grpo_reads_each_prompt_once_for_its_answers_with_the_loss_and_gradients_of_one_row_each(family):
    # three prompts of 4, 4 and 3 tokens with 3, 2 and 3 answers of 1 to 6 tokens, padded as rollouts pad them
    torch.manual_seed(0)
    config = {"family": family, "vocab_size": 30, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    policy, ref = build_model(config), build_model(config).eval()  # a reference apart: the KL is not 0
    prompts = [torch.randint(1, 30, (n,)) for n in (4, 4, 3)]
    rows = [(0, 2), (0, 6), (0, 1), (1, 5), (1, 3), (2, 4), (2, 6), (2, 2)]  # (prompt, answer length)
    T = max(len(prompts[p]) + n for p, n in rows) - 1
    x, y = torch.zeros(len(rows), T, dtype=torch.long), torch.full((len(rows), T), IGNORE)
    for i, (p, n) in enumerate(rows):
        seq = torch.cat([prompts[p], torch.randint(1, 30, (n,))])
        x[i, : len(seq) - 1], y[i, len(prompts[p]) - 1 : len(seq) - 1] = seq[:-1], seq[len(prompts[p]) :]
    assert prompt_groups(x, y) == [3, 2, 3] and prompt_groups(x[4:7], y[4:7]) == [1, 2]
    advantages, rewards = torch.randn(len(rows)), torch.rand(len(rows))

    def loss_and_grads(share: bool, lo: int, hi: int):
        policy.zero_grad()
        score = GRPO(0.5, functools.partial(token_logprobs, ref), 16 if share else None)
        loss, metrics = score.loss(policy, (x[lo:hi], y[lo:hi], advantages[lo:hi], rewards[lo:hi]))
        loss.backward()
        return loss, metrics["kl"], [p.grad.clone() for p in policy.parameters()]

    for lo, hi in [(0, 8), (4, 7)]:  # a whole batch, and a pass that cuts a group
        (apart, kl_apart, grads_apart), (shared, kl_shared, grads) = loss_and_grads(False, lo, hi), loss_and_grads(True, lo, hi)
        torch.testing.assert_close(shared, apart, rtol=0, atol=1e-6)  # fp32: the same sums, in another order
        torch.testing.assert_close(kl_shared, kl_apart, rtol=0, atol=1e-6)
        assert kl_apart > 1e-3
        for g, g_apart in zip(grads, grads_apart):
            torch.testing.assert_close(g, g_apart, rtol=1e-4, atol=1e-6)
