"""Average negative log-likelihood per token, perplexity, bits per character and per byte; and for generated
outputs, exact match and character error rate."""
from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from fournil.data.batches import IGNORE, pack
from fournil.device import autocast
from fournil.models.base import packed_width, shares_prompts


BAR_AFTER = 2.0  # seconds a pass over held-out data lasts before it shows a bar


def scoring_bar(total: int | None, split: str, unit: str) -> tqdm:
    """A bar for a pass over held-out data, on a terminal, once it has lasted ``BAR_AFTER`` seconds, cleared at its
    end: scoring thousands of examples with a real model takes minutes on a CPU (SmolLM2's reward model over
    hh_rlhf_harmless: about 14 minutes on 2 cores), where most validations during training take less than a second."""
    return tqdm(total=total, desc=f"scoring {split}", unit=unit, unit_scale=unit == "tok", disable=None, leave=False,
                delay=BAR_AFTER, file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def evaluate_nll(model, data, tokenizer, dtype=torch.float32, batch_size: int = 64, max_tokens: int | None = None) -> dict:
    """Score every target token of ``data`` (or about ``max_tokens`` of them).

    ``nll`` is in nats per token; ``bpc`` and ``bpb`` divide the same total, in bits, by the characters and the
    UTF-8 bytes the scored tokens stand for (a document's end counts as one newline). A byte-level token may hold
    part of a character: characters are counted where they start. A Transformer reads each batch packed
    (:func:`pack`) where that saves positions: SmolLM2 scored rasbt_instructions' val answers in fp32 in 5.0 s padded,
    3.6 s packed (rows as wide as the model, the system prompt once per row).
    """
    was_training = model.training
    model.eval()
    device = model.device
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    nbytes = torch.tensor([len(b) for b in pieces])
    chars = torch.tensor([sum((c & 0xC0) != 0x80 for c in b) for b in pieces])  # UTF-8 bytes that start a character
    total, tokens, n_chars, n_bytes = 0.0, 0, 0, 0
    with scoring_bar(min(data.num_targets, max_tokens or data.num_targets), data.split, "tok") as bar:
        for *inputs, y in data.batches(batch_size, max_tokens):
            packed = {}
            if getattr(model, "packs", False):  # short documents (names, instruction examples) packed
                px, sees, py, _ = pack(inputs[0], y, packed_width(model), shares_prompts(model))
                if px.numel() < y.numel():
                    inputs, packed, y = [px], {"sees": sees.to(device)}, py
            with autocast(device, dtype):
                total -= model(*(x.to(device) for x in inputs), targets=y.to(device), **packed).sum().item()
            targets = y[y != IGNORE]
            bar.update(len(targets))
            tokens += len(targets)
            n_chars += int(chars[targets].sum())
            n_bytes += int(nbytes[targets].sum())
    model.train(was_training)
    nll = total / tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        # (targets that are all end-of-turn tokens, as empty answers have, hold no text: no rate per character)
        "bpc": total / math.log(2) / n_chars if n_chars else math.nan,
        "bpb": total / math.log(2) / n_bytes if n_bytes else math.nan,
        "tokens": tokens,
    }


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions of characters that turn a into b."""
    if a == b:
        return 0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def output_scores(outputs: list[str], targets: list[str]) -> dict:
    """``exact``: the share of outputs equal to their target; ``cer``: character edits per target character."""
    edits = sum(edit_distance(o, t) for o, t in zip(outputs, targets))
    return {"exact": sum(o == t for o, t in zip(outputs, targets)) / len(targets),
            "cer": edits / max(1, sum(map(len, targets))), "outputs": len(targets)}
