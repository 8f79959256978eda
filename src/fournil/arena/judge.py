"""Judge models: a model reads a question and two answers and names the better one (pairwise "LLM-as-a-judge", as
in MT-Bench: the verdict is "[[A]]", "[[B]]" or "[[C]]" for a tie).

A judge favours a position as much as an answer, so each pair is judged in both orders; a verdict that follows the
position rather than the answer is recorded as a tie. A judge loaded here gives the verdict it finds most likely (the
log-likelihood of each of the three, as the start of its answer: no text to parse, and small models can judge); a
remote one writes its answer, and the last verdict in it counts ("[A]" too; none: no vote).
"""
from __future__ import annotations

import re
from pathlib import Path

from fournil.arena.store import Battle, Store
from fournil.data.preferences import read_prompts as conversations
from fournil.data.sources import read_text
from fournil.errors import ContextFull, FournilError
from fournil.generate import SamplingParams, complete
from fournil.generate.engine import score_choices
from fournil.generate.answerers import Local, check_chats

INSTRUCTIONS = (
    "You judge two AI assistants' answers to the user's question below, impartially. Consider which answer follows "
    "the question and is more helpful, relevant, accurate and detailed; do not let the order of the answers, their "
    "length or the assistants' names sway you. Answer with your verdict only: [[A]] if assistant A's answer is "
    "better, [[B]] if assistant B's is, [[C]] if they are equally good.")
VERDICTS = {"[[A]]": "a", "[[B]]": "b", "[[C]]": "tie"}
SWAPPED = {"a": "b", "b": "a", "tie": "tie"}


def judge_messages(question: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": f"[Question]\n{question}\n\n[Assistant A's answer]\n{first}\n[End of assistant "
                                        f"A's answer]\n\n[Assistant B's answer]\n{second}\n[End of assistant B's answer]"}]


class Judge:
    """``model`` (a :class:`Local` or a remote model) as a judge."""

    def __init__(self, model):
        check_chats(model)
        self.model, self.name = model, str(model)

    def prefers(self, question: str, first: str, second: str) -> str | None:
        """Which of the answers shown as A (``first``) and B is better: "a", "b", "tie", or None (no verdict)."""
        messages = judge_messages(question, first, second)
        if isinstance(self.model, Local):
            run = self.model.run
            prompt, options = run.tokenizer.chat_ids(messages), [run.tokenizer.encode(text) for text in VERDICTS]
            if len(prompt) + sum(map(len, options)) > run.model.config.block_size:
                return None  # the question and answers do not fit the judge's context
            # the three verdicts after the prompt, read once: rows of the prompt's last token and a verdict's
            rows = [([prompt[-1], *option[:-1]], option) for option in options]
            scores = [logprob for logprob, _ in score_choices(run.model, [(prompt[:-1], rows)], run.measure_dtype)[0]]
            return list(VERDICTS.values())[scores.index(max(scores))]
        answer = "".join(self.model.chat(messages, SamplingParams(max_new_tokens=512, temperature=0)))
        found = re.findall(r"\[\[?([ABC])\]\]?", answer)  # a small judge may write [A] for [[A]]
        return VERDICTS[f"[[{found[-1]}]]"] if found else None

    def verdict(self, battle: Battle) -> str | None:
        """The verdict on ``battle``, asked in both orders: a preference that flips with the order is a tie."""
        shown = self.prefers(battle.prompt, battle.answer_a, battle.answer_b)
        swapped = self.prefers(battle.prompt, battle.answer_b, battle.answer_a)
        if shown is None or swapped is None:
            return None
        return shown if shown == SWAPPED[swapped] else "tie"


def read_prompts(spec: str, n: int) -> list[str]:
    """The last ``n`` prompts of a text file, one per line, or of an instruction, preference or prompt set (bundled,
    or a file in any form fine-tuning and alignment read): the first user message of each."""
    if spec.endswith(".txt"):
        if not Path(spec).is_file():
            raise FournilError(f"--prompts {spec}: no such file")
        prompts = [line.strip() for line in read_text(spec).splitlines() if line.strip()]
    else:
        prompts = [asked for c, _ in conversations(spec) if (asked := next((m["content"] for m in c
                                                                            if m["role"] == "user"), "").strip())]
    if not prompts:
        raise FournilError(f"--prompts {spec} holds no prompts")
    return prompts[-n:]


def answers(model, prompts: list[str], params: SamplingParams, max_batch: int = 8) -> list[str]:
    """``model``'s answer to each prompt: a local model's generated together (continuous batching)."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    if not isinstance(model, Local):
        return ["".join(model.chat(m, params)) for m in messages]
    run = model.run
    ids, each = zip(*(model.chat_prompt(m, params) for m in messages))
    return [c.text for c in complete(run.model, run.tokenizer, list(ids), list(each), run.dtype, max_batch=max_batch)]


def check_fits(model, prompts: list[str], params: SamplingParams) -> None:
    """Refuse a model loaded here whose context cannot hold each prompt in its chat template."""
    if isinstance(model, Local):
        for n, prompt in enumerate(prompts, start=1):
            try:
                model.chat_prompt([{"role": "user", "content": prompt}], params)
            except ContextFull as e:
                raise FournilError(f"{model} cannot answer prompt {n} of {len(prompts)} ({prompt[:40]!r}): {e}; leave "
                                   f"it out, or give shorter prompts with --prompts FILE") from None


def tournament(contestants: dict, judge: Judge, prompts: list[str], store: Store, params: SamplingParams,
               announce=print) -> int:
    """Every pair of contestants on every prompt, each battle stored and judged; returns the votes recorded."""
    names = sorted(contestants)
    said = {}
    for name in names:
        announce(f"{name} answers {len(prompts)} prompt{'s' * (len(prompts) != 1)}")
        said[name] = answers(contestants[name], prompts, params)
    recorded = 0
    settings = {"temperature": params.temperature, "max_tokens": params.max_new_tokens}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    for n, prompt in enumerate(prompts):
        for a, b in pairs:
            battle = store.add_battle(prompt, (a, b), (said[a][n], said[b][n]), settings, params.seed or 0)
            recorded += judge_battle(judge, battle, store)
        announce(f"judged {n + 1}/{len(prompts)} prompts ({recorded} vote{'s' * (recorded != 1)})")
    return recorded


def judge_battle(judge: Judge, battle: Battle, store: Store) -> int:
    """Judge ``battle`` and store the verdict; 1 if there was one."""
    verdict = judge.verdict(battle)
    if verdict is None:
        return 0
    store.vote(battle.id, verdict, "judge", judge.name)
    return 1
