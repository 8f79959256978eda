"""Preference data for alignment: a prompt with a chosen and a rejected answer, both rendered by the chat template.

Each record has ``prompt``, ``chosen`` and ``rejected``. The prompt is a user message, a list of chat messages, or a
transcript in Anthropic's layout (``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:``), which is read
as the conversation it records; each answer is text or chat messages. Without a prompt (TRL's implicit prompt, and
Anthropic's own hh-rlhf files), ``chosen`` and ``rejected`` are whole conversations that differ in their last answer.
Answers are rendered as fine-tuning renders them (loss on the answer and its end-of-turn token), so a pair is two
instruction examples that share their prompt.
"""
from __future__ import annotations

import torch

from fournil.data.instructions import (
    BUNDLED_INSTRUCTIONS,
    InstructionData,
    chat_messages,
    data_path,
    keep_short,
    other_kind,
    pad_id,
    prompt_messages,
    read_rows,
    render_example,
    split_examples,
    to_messages,
    transcript,
)
from fournil.errors import FournilError

BUNDLED_PREFERENCES = {
    "rasbt_preferences": "rasbt_preferences.jsonl",  # polite answers chosen over impolite ones (LLMs-from-scratch)
    "hh_rlhf_harmless": "hh_rlhf_harmless.jsonl",  # Anthropic's harmlessness pairs (red-teaming conversations)
}
PAIR_FORMS = ("a preference record has 'prompt', 'chosen' and 'rejected' (each text or chat messages), or only "
              "'chosen' and 'rejected', each the whole conversation, its answer last")


def read_pairs(spec: str) -> list[tuple[list[dict], list[dict]]]:
    """Every record as two conversations, the prompt followed by the chosen answer and by the rejected one."""
    return pairs_in(read_rows(data_path(spec, BUNDLED_PREFERENCES, "preference")))


def pairs_in(rows: list[tuple[str, object]]) -> list[tuple[list[dict], list[dict]]]:
    """The pairs of records read by :func:`read_rows`."""
    pairs = []
    for where, row in rows:
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            missing = [k for k in ("chosen", "rejected") if k not in row] if isinstance(row, dict) else []
            raise FournilError(f"{where}: {PAIR_FORMS}{' (missing ' + ', '.join(missing) + ')' if missing else ''}"
                               f"{other_kind(row, 'preference pairs')}")
        pairs.append(pair_of(row, where))
    return pairs


def pair_of(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected conversation of a record: its prompt followed by each answer, or (without a
    prompt, as in Anthropic's own hh-rlhf files) two whole conversations that differ only in their last answer."""
    if "prompt" in row:
        prompt = prompt_messages(row["prompt"], where)
        pair = tuple(prompt + ([{"role": "assistant", "content": row[k]}] if isinstance(row[k], str)
                               else chat_messages(row[k], where, k)) for k in ("chosen", "rejected"))
    else:
        pair = tuple(whole_conversation(row[k], where, k) for k in ("chosen", "rejected"))
        if pair[0][:-1] != pair[1][:-1]:
            raise FournilError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be the same conversation "
                               f"up to their last answer; they differ before it")
    if any(c[-1]["role"] != "assistant" for c in pair):
        raise FournilError(f"{where}: 'chosen' and 'rejected' must each end with an assistant answer")
    return pair


def whole_conversation(value, where: str, field: str) -> list[dict]:
    if isinstance(value, list):
        return chat_messages(value, where, field)
    if isinstance(value, str) and (messages := transcript(value)):
        return messages
    raise FournilError(f"{where}: without a 'prompt', {field!r} must be the whole conversation: a list of chat "
                       f"messages, or a transcript ('Human: ...\\n\\nAssistant: ...'); or add the 'prompt'")


class PreferenceData:
    """Rendered pairs. A batch is ``(x, y)`` of shape (pairs, 2, T), chosen then rejected, targets ``IGNORE`` outside
    the answers; with reference log-probabilities computed beforehand (``ref``, one pair per row), they come third."""

    def __init__(self, pairs: list[tuple], pad: int, split: str):
        self.split = split
        self.answers = InstructionData([example for pair in pairs for example in pair], pad, split)
        self.num_targets = self.answers.num_targets  # the answers' tokens, chosen and rejected: what is scored
        self.ref: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.answers.seqs) // 2

    def _collate(self, picks: list[int]) -> tuple:
        x, y = self.answers._collate([i for p in picks for i in (2 * p, 2 * p + 1)])
        batch = (x.view(len(picks), 2, -1), y.view(len(picks), 2, -1))
        return batch + (self.ref[picks],) if self.ref is not None else batch

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple:
        return self._collate(torch.randint(len(self), (batch_size,), generator=generator).tolist())

    def batches(self, batch_size: int, max_tokens: int | None = None, width: int = 2048):
        """Every pair once, in order (so that per-pair results line up), or the first ones to about ``max_tokens``
        answer tokens; at most ``width`` tokens a batch."""
        picks, longest, seen = [], 0, 0
        for p in range(len(self)):
            size = max(len(self.answers.seqs[2 * p]), len(self.answers.seqs[2 * p + 1]))
            if picks and (len(picks) == batch_size or 2 * (len(picks) + 1) * max(longest, size) > width):
                yield self._collate(picks)
                picks, longest = [], 0
            picks.append(p)
            longest = max(longest, size)
            seen += int(self.answers.learned[2 * p][1:].sum() + self.answers.learned[2 * p + 1][1:].sum())
            if max_tokens and seen >= max_tokens:
                break
        yield self._collate(picks)

    def prompts(self, n: int | None = None) -> list[list[int]]:
        """The prompts (up to the answer) of the first ``n`` pairs."""
        return [s[: int(m.int().argmax())].tolist()
                for s, m in zip(self.answers.seqs[0 : 2 * (n or len(self)) : 2], self.answers.learned[::2])]

    def prompt_messages(self, n: int | None = None) -> list[list[dict]]:
        """The same prompts as chat messages."""
        return [chosen[:-1] for chosen in self.answers.conversations[0 : 2 * (n or len(self)) : 2]]


def final_answer(ids: list[int], learned: list[bool]) -> tuple[list[int], list[bool]]:
    """Only the last answer learned: earlier turns of a transcript are part of the prompt."""
    start = len(learned) - learned[::-1].index(True)
    while start > 0 and learned[start - 1]:
        start -= 1
    return ids, [False] * start + learned[start:]


def load_preferences(spec: str, tokenizer, max_length: int, split=(0.9, 0.05, 0.05), seed: int = 1337,
                     announce=print) -> dict[str, PreferenceData]:
    """Train/val/test sets of rendered pairs; pairs with an answer longer than ``max_length`` tokens are skipped."""
    parts = split_examples(render_pairs(spec, tokenizer, max_length, announce), split, seed, spec)
    return {name: PreferenceData(part, pad_id(tokenizer), name) for name, part in parts.items()}


def render_pairs(spec: str, tokenizer, max_length: int, announce=print) -> list[tuple]:
    """Every pair of ``spec`` rendered, but those longer than ``max_length`` tokens and those whose two answers are
    the same (nothing to prefer: DPO's loss stays at log 2 on them, and no reward can rank them)."""
    pairs = read_pairs(spec)
    rendered = [tuple((*final_answer(*render_example(tokenizer, c)), c) for c in pair)
                for pair in pairs if pair[0] != pair[1]]
    if len(rendered) < len(pairs):
        announce(f"skipped {len(pairs) - len(rendered)} of {len(pairs)} pairs whose chosen and rejected answers are "
                 f"the same")
    return keep_short(rendered, lambda pair: max(len(pair[0][0]), len(pair[1][0])), max_length, announce)


def read_prompts(spec: str) -> list[tuple[list[dict], str | None]]:
    """The prompts of a preference set, or of an instruction set (each conversation up to its last answer), each with
    its reference answer for a reward to check answers against: an instruction set's answer (GSM8K's worked answer),
    a prompt's completion; None for a prompt alone, and for a preference set's (its chosen answer is preferred to
    another, not right)."""
    rows = read_rows(data_path(spec, {**BUNDLED_PREFERENCES, **BUNDLED_INSTRUCTIONS}, "prompt"))
    if isinstance(rows[0][1], dict) and "chosen" in rows[0][1]:
        return [(chosen[:-1], None) for chosen, _ in pairs_in(rows)]
    if isinstance(rows[0][1], dict) and "prompt" in rows[0][1] and "completion" not in rows[0][1]:
        return [(prompt_messages(row.get("prompt") if isinstance(row, dict) else None, where), None)
                for where, row in rows]
    return [(messages[:-1], messages[-1]["content"]) for messages in (to_messages(row, w) for w, row in rows)]


class Prompts:
    """Prompts to answer (reinforcement learning's data): the conversations, their tokens as generation reads them,
    and their reference answers (:func:`read_prompts`)."""

    def __init__(self, conversations: list[list[dict]], ids: list[list[int]], split: str,
                 references: list[str | None] | None = None):
        self.conversations, self.ids, self.split = conversations, ids, split
        self.references = references or [None] * len(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def prompts(self, n: int | None = None) -> list[list[int]]:
        return self.ids[:n]

    def prompt_messages(self, n: int | None = None) -> list[list[dict]]:
        return self.conversations[:n]


def load_prompts(spec: str, tokenizer, max_length: int, split=(0.9, 0.05, 0.05), seed: int = 1337,
                 announce=print) -> dict[str, Prompts]:
    """Train/val/test prompts; those longer than ``max_length`` tokens are skipped."""
    rendered = [(c, tokenizer.chat_ids(c), reference) for c, reference in read_prompts(spec)]
    parts = split_examples(keep_short(rendered, lambda r: len(r[1]), max_length, announce), split, seed, spec)
    return {name: Prompts([c for c, _, _ in part], [i for _, i, _ in part], name, [r for _, _, r in part])
            for name, part in parts.items()}
