"""The one sampling function: extend a batch of prompts token by token."""
from __future__ import annotations

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
def sample_ids(
    model,
    prompt: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (new tokens only), each ending before ``stop_id`` if it comes.

    ``temperature=0`` picks the most likely token each time. The context is cropped to the model's block size.
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
    x = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(x[:, -block:])[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        new.append(nxt)
        if stop_id is not None:
            done |= nxt == stop_id
            if done.all():
                break
        x = torch.cat([x, nxt[:, None]], dim=1)
    model.train(was_training)
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(num_samples)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in out]
