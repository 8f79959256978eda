"""The one sampling function: extend a batch of prompts token by token."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from fournil.errors import FournilError


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits reshaped by temperature, then cut to the top-k tokens and to the smallest set holding top-p mass."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until the mass before them reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def check_controls(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise FournilError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    if top_k is not None and top_k < 1:
        raise FournilError(f"--top-k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise FournilError(f"--top-p must be in (0, 1] (got {top_p})")


@torch.no_grad()
def generate_steps(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> Iterator[torch.Tensor]:
    """The one sampling loop: yields the next token of every prompt (a tensor of shape (B,)) at each step.

    Prompts must be of equal length. ``temperature=0`` picks the most likely token each time. The context is cropped
    to the model's block size. The caller decides when to stop (it stops iterating).
    """
    check_controls(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    device = model.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    block = model.config.block_size
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    try:
        for _ in range(max_new_tokens):
            logits = model(x[:, -block:])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            yield nxt
            x = torch.cat([x, nxt[:, None]], dim=1)
    finally:
        model.train(was_training)


def sample_ids(model, prompt: list[int], num_samples: int, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, stop_ids: set[int] = frozenset(),
               seed: int | None = None) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (new tokens only), each ending before a stop token if one comes."""
    rows = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for nxt in generate_steps(model, [prompt] * num_samples, max_new_tokens, temperature, top_k, top_p, seed):
        for i, t in enumerate(nxt.tolist()):
            done[i] = done[i] or t in stop_ids
            if not done[i]:
                rows[i].append(t)
        if all(done):
            break
    return rows


def stream_ids(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, stop_ids: set[int] = frozenset(), seed: int | None = None) -> Iterator[int]:
    """One continuation of ``prompt``, token by token, ending before a stop token."""
    for nxt in generate_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed):
        token = int(nxt[0])
        if token in stop_ids:
            return
        yield token


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens come; a character split across tokens waits for its last byte."""
    done, text = [], ""
    for token in ids:
        done.append(token)
        new = tokenizer.decode(done)
        if not new.endswith("\ufffd") and len(new) > len(text):
            yield new[len(text):]
            text = new
