"""Instruction data for supervised fine-tuning: examples rendered through the model's chat template, loss on answers.

The usual forms are read, as JSONL, a JSON array or Parquet: Alpaca (``instruction``, optional ``input``, ``output``;
or Dolly's ``context`` and ``response``), chat (``messages``, each with a ``role`` and a ``content``), ShareGPT
(``conversations``, each with ``from`` and ``value``), TRL's prompt-completion (``prompt`` and ``completion``, as
text or as chat messages) and question sets' ``question`` and ``answer`` (GSM8K). Each conversation becomes the
tokens the model will see at generation time: the prompt parts exactly as ``chat`` renders them (no loss) and each
assistant answer up to and including the token that ends its turn (loss), so that a tuned model learns to stop.
"""
from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

import torch

from fournil.config import check_split
from fournil.data.batches import IGNORE, LineData, thinned
from fournil.data.sources import decoded, holds_documents, nearest, parquet_table
from fournil.errors import FournilError, typed
from fournil.text import HALF_PAIR, unpaired

BUNDLED_INSTRUCTIONS = {
    "rasbt_instructions": "rasbt_instructions.jsonl",  # English, Alpaca form (LLMs-from-scratch, chapter 7)
    "fr_oasst1": "fr_oasst1.jsonl",  # French, Alpaca form (OpenAssistant oasst1)
    "fr_oasst1_chat": "fr_oasst1_chat.jsonl",  # French conversations (OpenAssistant oasst1)
    "gsm8k_train": "gsm8k_train.jsonl",  # English arithmetic word problems, a question and its worked answer
}

# For models whose tokenizer has no chat template: Alpaca's headings, each answer closed by the end-of-text token.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def data_path(spec: str, bundled: dict[str, str], what: str) -> Path:
    """A bundled JSONL file by name, or the file at ``spec``."""
    if spec in bundled:
        return Path(str(resources.files("fournil.data") / "files" / bundled[spec]))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FournilError(bundled_elsewhere(spec, f"{what} examples") or
                           f"no {what} set or file named {spec!r}{nearest(spec, bundled)}: use a bundled one "
                           f"({', '.join(bundled)}) or a .jsonl, .json or .parquet file of {what} examples")
    return path


def read_rows(path: Path) -> list[tuple[str, object]]:
    """The records of a JSONL file, a JSON array or a Parquet file (as the Hugging Face Hub stores datasets), each
    with where it is (``file, line N``) for error messages."""
    if path.suffix == ".parquet":
        rows = [(f"{path}, row {n}", {k: v for k, v in row.items() if v is not None})  # (a null is a field left out)
                for n, row in enumerate(parquet_table(path).to_pylist(), 1)]
        if not rows:
            raise FournilError(f"{path} holds no examples")
        return rows
    text = decoded(path.read_bytes(), path).removeprefix("\ufeff")  # (the mark some editors begin a file with)
    if text.lstrip().startswith("[") and path.suffix != ".jsonl":
        try:
            rows = [(f"{path}, item {n}", row) for n, row in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise FournilError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}, line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                if not rows and not line.lstrip().startswith(("{", "[")):  # prose, as `fournil train` reads
                    raise FournilError(f"{path} holds text, not JSON records (line {n}: {line.strip()[:40]!r}): "
                                       f"train on text with `fournil train --data {typed(path)}`; this command reads "
                                       f"one JSON object per line") from None
                if not rows and isinstance(whole := parsed(text), dict):  # (an object over several lines)
                    raise FournilError(f"{path} holds one JSON object (keys: {', '.join(map(str, list(whole)[:8]))}), "
                                       f"not records: give a JSON array of objects, or one object per line (.jsonl)"
                                       ) from None
                raise FournilError(f"{path}, line {n}: not valid JSON ({e.msg}); each line must be one JSON "
                                   f"object") from None
    if not rows:
        raise FournilError(f"{path} holds no examples")
    for where, row in rows:
        if (field := unpaired(row)) is not None:
            raise FournilError(f"{where}: {field or 'the record'} {HALF_PAIR}: write the character itself")
    return rows


def parsed(text: str):
    """The JSON value ``text`` holds whole, or None."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


RECORDS = {  # the kinds of JSONL record fournil learns from: their fields, and the command that learns from them
    "preference pairs": (("prompt", "chosen", "rejected"), "fournil align (or fournil reward)"),
    "instructions": (("instruction", "output"), "fournil finetune (or distill, or align --method grpo)"),
    "conversations": (("messages",), "fournil finetune (or distill, or align --method grpo)"),
    "ShareGPT conversations": (("conversations",), "fournil finetune (or distill, or align --method grpo)"),
    "prompts and completions": (("prompt", "completion"), "fournil finetune (or distill, or align --method grpo)"),
    "(source, target) pairs": (("source", "target"), "fournil train --model seq2seq"),
    "documents": (("text",), "fournil train (or fournil prepare)"),
}


def other_kind(row, expected: str) -> str:
    """Where ``row`` is a record of another kind than ``expected`` (a key of RECORDS), what it is and which command
    learns from it, to end an error with; else nothing."""
    kind = next((k for k, (fields, _) in RECORDS.items() if isinstance(row, dict) and all(f in row for f in fields)),
                expected)
    return "" if kind == expected else f"; this file holds {kind}: learn from them with {RECORDS[kind][1]}"


def bundled_elsewhere(spec: str, expected: str) -> str | None:
    """Where ``spec`` names a bundled dataset of another kind than ``expected``, an error that says what it holds and
    which command learns from it (``finetune --data rasbt_preferences``, ``train --data rasbt_instructions``)."""
    from fournil.data.preferences import BUNDLED_PREFERENCES
    from fournil.data.sources import BUNDLED

    kind = ("instructions" if spec in BUNDLED_INSTRUCTIONS else "preference pairs" if spec in BUNDLED_PREFERENCES
            else "(source, target) pairs" if spec == "nombres" else "text" if spec in BUNDLED else None)
    if kind is None:
        return None
    return (f"the bundled {spec} holds {kind}, not {expected}: learn from it with "
            f"{'fournil train' if kind == 'text' else RECORDS[kind][1]}")


def read_conversations(spec: str) -> list[list[dict]]:
    """Every example of an instruction file as a list of chat messages; malformed lines are named."""
    return [to_messages(row, where) for where, row in read_rows(data_path(spec, BUNDLED_INSTRUCTIONS, "instruction"))]


ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
FORMS = ("an example has 'instruction', optional 'input' and 'output' (Alpaca; Dolly's 'context' and 'response' "
         "too); or 'messages' (chat); or 'conversations' (ShareGPT); or 'prompt' and 'completion'; or 'question' and "
         "'answer' (GSM8K), as texts")


def to_messages(row, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise FournilError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = chat_messages(row["messages"], where, "messages")
    elif "conversations" in row:
        turns = row["conversations"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES
                                                          and isinstance(t.get("value"), str) for t in turns)):
            raise FournilError(f"{where}: 'conversations' must be a list of "
                               f"{{'from': system|human|gpt, 'value': text}}")
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    elif "prompt" in row and "completion" in row:
        answer = row["completion"]
        messages = prompt_messages(row["prompt"], where) + (
            [{"role": "assistant", "content": answer}] if isinstance(answer, str)
            else chat_messages(answer, where, "completion"))
    elif isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    else:
        return alpaca_messages(row, where)
    if messages[-1]["role"] != "assistant":
        raise FournilError(f"{where}: the conversation must end with an assistant message (the answer to learn)")
    if wrong := next((m for m in messages if m.get("weight", 1) not in (0, 1)), None):
        raise FournilError(f"{where}: a message's 'weight' is 0 (shown, not learned) or 1, not "
                           f"{json.dumps(wrong['weight'])}")
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise FournilError(f"{where}: every answer has weight 0: there is nothing to learn in it")
    return messages


def alpaca_messages(row: dict, where: str) -> list[dict]:
    if "output" not in row and "response" in row:  # Dolly's names for Alpaca's fields
        row = {"instruction": row.get("instruction"), "input": row.get("context"), "output": row["response"]}
    if wrong := next((k for k in ("instruction", "input", "output") if row.get(k) is not None
                      and not isinstance(row[k], str)), None):
        raise FournilError(f"{where}: {wrong!r} must be a text, not {json.dumps(row[wrong])[:60]}")
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing:
        has = f"it has {', '.join(map(repr, row))}; " if row else "it is empty; "
        raise FournilError(f"{where}: missing {' and '.join(repr(k) for k in missing)} ({has}{FORMS})"
                           f"{other_kind(row, 'instructions')}")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def chat_messages(messages, where: str, field: str) -> list[dict]:
    """``messages`` checked to be a list of chat messages."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)):
        raise FournilError(f"{where}: {field!r} must be a list of {{'role': system|user|assistant, 'content': text}}")
    return messages


def prompt_messages(prompt, where: str) -> list[dict]:
    """A record's prompt as chat messages: a user message, a list of messages, or a transcript in Anthropic's layout
    (``Human: ...`` and ``Assistant: ...`` turns apart by blank lines, the last ``Assistant:`` empty), read as the
    conversation it records."""
    if isinstance(prompt, list):
        return chat_messages(prompt, where, "prompt")
    if not isinstance(prompt, str):
        raise FournilError(f"{where}: 'prompt' must be text or a list of chat messages")
    if (messages := transcript(prompt)) is None:
        return [{"role": "user", "content": prompt}]
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # the transcript ends where the answer starts
    if not messages or messages[-1]["role"] != "user":
        raise FournilError(f"{where}: the transcript must end with a Human turn (then 'Assistant:')")
    return messages


def transcript(text: str) -> list[dict] | None:
    """The conversation a transcript in Anthropic's layout records, as chat messages; None for other text."""
    if not text.lstrip().startswith("Human:"):
        return None
    parts = TURN.split(text.lstrip())[1:]  # speaker, text, speaker, text...
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[::2], parts[1::2])]


def render_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, for each, whether it is learned: each assistant answer (but one of weight 0)
    and the token that ends its turn. Prompt parts are tokenized exactly as generation tokenizes a prompt."""
    ids, learned, done = [], [], ""
    stops = tokenizer.stop_ids
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.chat_text(messages[:i], add_generation_prompt=True)
        full = tokenizer.chat_text(messages[: i + 1], add_generation_prompt=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise FournilError("the chat template does not render a conversation as its prompt followed by the answer; "
                               "fine-tuning needs a template that does")
        prompt_ids = tokenizer.encode(prefix[len(done):])
        answer = tokenizer.encode(full[len(prefix):])
        end = next((k for k, t in enumerate(answer) if t in stops), None)
        if end is None:
            raise FournilError("the chat template does not end an answer with an end-of-turn token, so a tuned model "
                               "would never learn to stop")
        ids += prompt_ids + answer
        kept = m.get("weight", 1) == 1  # (OpenAI's fine-tuning files: weight 0, an answer shown but not learned)
        learned += [False] * len(prompt_ids) + [kept] * (end + 1) + [False] * (len(answer) - end - 1)
        done = full
    return ids, learned


class InstructionData(LineData):
    """Rendered conversations; the targets of prompt tokens are ``IGNORE``, so only answers carry loss."""

    def __init__(self, examples: list[tuple], pad: int, split: str):
        """``examples``: (token ids, which are learned) and, unless packed, the conversation they render."""
        self.split, self.pad = split, pad
        self.seqs = [torch.tensor(e[0]) for e in examples]
        self.learned = [torch.tensor(e[1]) for e in examples]
        self.conversations = [e[2] if len(e) > 2 else None for e in examples]
        self.num_targets = sum(int(m[1:].sum()) for m in self.learned)

    def __len__(self) -> int:
        return len(self.seqs)

    def _collate(self, picks) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(self.seqs[i]) for i in picks) - 1
        x = torch.full((len(picks), width), self.pad, dtype=torch.long)
        y = torch.full((len(picks), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(picks):
            s, m = self.seqs[i], self.learned[i]
            x[row, : len(s) - 1] = s[:-1]
            y[row, : len(s) - 1] = torch.where(m[1:], s[1:], IGNORE)
        return x, y

    def sample(self, batch_size: int, generator: torch.Generator):
        return self._collate(torch.randint(len(self.seqs), (batch_size,), generator=generator).tolist())

    def batches(self, batch_size: int, max_tokens: int | None = None, width: int = 2048):
        """Every example once (or about ``max_tokens`` answer tokens' worth), grouped by length, at most
        ``batch_size`` examples and ``width`` tokens a batch (a large vocabulary's logits are big)."""
        group: list[int] = []
        for i in thinned(sorted(range(len(self.seqs)), key=lambda i: len(self.seqs[i])), self.num_targets, max_tokens):
            if group and (len(group) == batch_size or (len(group) + 1) * len(self.seqs[i]) > width):
                yield self._collate(group)
                group = []
            group.append(i)
        yield self._collate(group)

    def prompts(self, n: int) -> list[list[int]]:
        """The first ``n`` examples up to their first answer: prompts the model has not been tuned on."""
        return [s[: int(m.int().argmax())].tolist() for s, m in zip(self.seqs[:n], self.learned[:n])]

    def prompt_messages(self, n: int) -> list[list[dict]]:
        """The same prompts as chat messages (for a model with a chat template of its own)."""
        return [c[: next(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in self.conversations[:n]]


def pack(examples: list[tuple], max_length: int) -> list[tuple[list[int], list[bool]]]:
    """Examples joined end to end into rows of at most ``max_length`` tokens: fewer, fuller rows, less padding. Each
    answer keeps its loss; an example may attend to the one before it in its row (as simple packing does)."""
    rows, ids, learned = [], [], []
    for e_ids, e_learned, *_ in examples:
        if ids and len(ids) + len(e_ids) > max_length:
            rows.append((ids, learned))
            ids, learned = [], []
        ids, learned = ids + e_ids, learned + e_learned
    return rows + [(ids, learned)] * bool(ids)


def split_examples(kept: list, split, seed: int, spec: str) -> dict[str, list]:
    """A seeded shuffle of the examples of ``spec`` cut into train/val/test, each split at least one example."""
    check_split(split)
    if len(kept) < 3:
        raise FournilError(f"{spec} has {len(kept)} usable example{'s' * (len(kept) != 1)}; training needs at least 3 "
                           f"(train, val, test)")
    random.Random(seed).shuffle(kept)
    n_val = max(1, round(split[1] * len(kept)))
    n_test = max(1, round(split[2] * len(kept)))
    return {"train": kept[: len(kept) - n_val - n_test], "val": kept[len(kept) - n_val - n_test : len(kept) - n_test],
            "test": kept[len(kept) - n_test :]}


def keep_short(rendered: list, length, max_length: int, announce, flag: str = "--max-length") -> list:
    """The examples of at most ``max_length`` tokens (``length`` measures one; ``flag`` sets the most)."""
    kept = [r for r in rendered if length(r) <= max_length]
    if len(kept) < len(rendered):
        announce(f"skipped {len(rendered) - len(kept)} of {len(rendered)} examples longer than {max_length} tokens "
                 f"(the longest: {max(map(length, rendered))}); to keep them, raise {flag}, up to the model's "
                 f"context, or take a model with a longer context")
    return kept


def load_examples(spec: str, tokenizer, max_length: int, announce=print, flag: str = "--max-length") -> list[tuple]:
    """Every example of ``spec`` rendered, but those longer than ``max_length`` tokens (skipped, and counted)."""
    rendered = [(*render_example(tokenizer, c), c) for c in read_conversations(spec)]
    return keep_short(rendered, lambda r: len(r[0]), max_length, announce, flag)


def load_instructions(spec: str, tokenizer, max_length: int, split=(0.9, 0.05, 0.05), seed: int = 1337,
                      announce=print, packed: bool = False, flag: str = "--max-length") -> dict[str, InstructionData]:
    """Train/val/test sets of rendered examples; those longer than ``max_length`` tokens (set by ``flag``) are skipped
    (and counted). With ``packed``, the training examples are packed into rows of ``max_length`` tokens."""
    parts = split_examples(load_examples(spec, tokenizer, max_length, announce, flag), split, seed, spec)
    if packed:
        parts["train"] = pack(parts["train"], max_length)
    return {name: InstructionData(part, pad_id(tokenizer), name) for name, part in parts.items()}


def is_instructions(spec: str) -> bool:
    """Whether ``spec`` names instructions: a bundled set, or a JSONL, JSON or Parquet file that holds no documents."""
    return spec in BUNDLED_INSTRUCTIONS or spec.endswith((".jsonl", ".json", ".parquet")) and not holds_documents(
        Path(spec).expanduser())


def pad_id(tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0
