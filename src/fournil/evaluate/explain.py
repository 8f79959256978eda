"""The probability a model gives each token of a text given the ones before, and what it expected instead: the table
a course shows for a bigram (``.m 0.123``, ``ma 0.454``, ...), for any model and tokenizer."""
from __future__ import annotations

import math

import torch

from fournil.data.instructions import render_example
from fournil.device import autocast
from fournil.errors import FournilError
from fournil.generate.engine import picked, score
from fournil.generate.seq2seq import encoded_source, written
from fournil.models.base import decoder_only
from fournil.plots.attention import visible
from fournil.tokenizers import CharTokenizer
from fournil.tokenizers.compression import piece

BOUNDARY_MARK = "."


def framed(tokenizer, text: str) -> list[int]:
    """The ids to score: a word framed by the document boundary (``lines`` data), after BOS when the model expects
    one; otherwise the text alone, whose first token is then context only."""
    ids = tokenizer.encode(text)
    if tokenizer.boundary_id is not None:
        return [tokenizer.boundary_id, *ids, tokenizer.boundary_id]
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        return [tokenizer.bos_id, *ids]
    return ids


def answered(tokenizer, question: str, answer: str) -> tuple[list[int], int, int]:
    """The ids of a conversation of ``question`` and ``answer`` as fine-tuning lays it out, and where the answer
    begins and where the token ending its turn ends: what a chat model learned to write, and so what is scored."""
    if not getattr(tokenizer, "chat_template", None):
        raise FournilError("--question explains an answer in a conversation, laid out by a chat template, and this "
                           "model has none (it continues texts): explain the text alone, or a chat model's answer "
                           "(smollm2, a fine-tuned run)")
    ids, learned = render_example(tokenizer, [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}])
    first = learned.index(True)
    return ids, first, first + sum(learned)


def shown(tokenizer, i: int) -> str:
    """A token as a table shows it: the boundary as ``.``, the rest as :func:`~fournil.plots.attention.visible`."""
    return BOUNDARY_MARK if i == tokenizer.boundary_id else visible(piece(tokenizer, i))


def checked_top(top) -> None:
    if not isinstance(top, int):
        raise FournilError(f"--top {top!r}: give a whole number of alternatives to show")
    if top < 1:
        raise FournilError(f"--top {top}: show at least 1 alternative")


@torch.no_grad()
def explain_text(model, tokenizer, text: str, dtype: torch.dtype = torch.float32, top: int = 5,
                 question: str | None = None) -> dict:
    """Each token after the first with its probability given the ones before it and the ``top`` tokens the model found
    most likely there; the total and average NLL. With ``question``, ``text`` is a chat model's answer to it: the rows
    are the answer's tokens and the one that ends its turn, read after the question as the chat template lays it out.

    A row's ``label`` is the transition for a character model (``ma``: ``a`` after ``m``), else the token itself.
    """
    decoder_only(model, "scoring a text")  # (before the text: a seq2seq model's vocabulary would be blamed)
    for name, value in (("text", text), ("question", question if question is not None else "")):
        if not isinstance(value, str):
            raise FournilError(f"the {name} to explain must be a string (got {type(value).__name__} {value!r})")
    checked_top(top)
    if question is not None:
        seq, first, end = answered(tokenizer, question, text)
        return table(tokenizer, seq[first - 1 : end], score(model, seq[:end], first, dtype, top=top), top)
    seq = framed(tokenizer, text)
    if len(seq) < 2:
        raise FournilError("give a longer text: explaining needs a token to predict after at least one of context")
    return table(tokenizer, seq, score(model, seq, 1, dtype, top=top), top)


@torch.no_grad()
def explain_output(model, tokenizer, source: str, dtype: torch.dtype = torch.float32, top: int = 5) -> dict:
    """An encoder-decoder's :func:`explain_text` of what it writes for ``source`` (greedy, then its end): each token's
    probability given the source and the tokens written before it, where it hesitated; and the text, ``written``."""
    checked_top(top)
    ids = encoded_source(model, tokenizer, source)
    was_training = model.training
    model.eval()
    try:
        target = written(model, ids)
        with autocast(model.device, dtype):
            logits = model(torch.tensor([ids], device=model.device), torch.tensor([target[:-1]], device=model.device))
    finally:
        model.train(was_training)
    scored = picked(logits[0].float().log_softmax(-1), target[1:], top)
    return table(tokenizer, target, scored, top) | {"written": tokenizer.decode(target[1:])}


def table(tokenizer, seq: list[int], scored: list, top: int) -> dict:
    """The rows of an explanation of ``seq``, whose tokens after the first were ``scored`` with their alternatives."""
    pairs = isinstance(tokenizer, CharTokenizer)
    rows = []
    for t, (logprob, alternatives) in enumerate(scored, start=1):
        token = shown(tokenizer, seq[t])
        rows.append({
            "label": shown(tokenizer, seq[t - 1]) + token if pairs else token,
            "token": token, "prob": math.exp(logprob), "logprob": logprob,
            "rank": 1 + sum(lp > logprob for lp in alternatives.values()),  # capped at top + 1: "not among them"
            "top": [(shown(tokenizer, i), math.exp(lp)) for i, lp in list(alternatives.items())[:top]],
        })
    total = -sum(r["logprob"] for r in rows)
    return {"context": shown(tokenizer, seq[0]), "rows": rows, "nll": total, "avg_nll": total / len(rows)}
