"""The probability a model gives to each next character of a word: the table a course shows for a bigram."""
from __future__ import annotations

import math

import torch

from fournil.errors import FournilError

BOUNDARY_MARK = "."


@torch.no_grad()
def explain_text(model, tokenizer, text: str) -> dict:
    """Each transition (previous token, next token, probability), and the total and average NLL.

    With a document boundary token (``lines`` data) the word is framed by it, shown as ``.``: ``.m``, ..., ``y.``.
    """
    ids = tokenizer.encode(text)
    b = tokenizer.boundary_id
    seq = [b, *ids, b] if b is not None else ids
    if len(seq) < 2:
        raise FournilError("give at least two characters: a transition needs a previous and a next one")
    model.eval()
    logits = model(torch.tensor([seq[:-1]], device=model.device))[0]
    logprobs = logits.double().log_softmax(-1)
    show = lambda i: BOUNDARY_MARK if i == b else tokenizer.itos[i]  # noqa: E731
    rows = []
    for t, nxt in enumerate(seq[1:]):
        lp = logprobs[t, nxt].item()
        rows.append({"context": show(seq[t]), "next": show(nxt), "prob": math.exp(lp), "logprob": lp})
    total = -sum(r["logprob"] for r in rows)
    return {"transitions": rows, "nll": total, "avg_nll": total / len(rows)}
