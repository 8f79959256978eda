"""Generating with an encoder-decoder: the encoder reads each source once, then the decoder writes the target a token
at a time from its key/value cache: sampled with the shared sampling controls (greedy at temperature 0), or the
most likely target a beam search finds."""
from __future__ import annotations

import torch

from fournil.device import autocast
from fournil.errors import FournilError
from fournil.generate.sampling import SamplingParams, choose


def _padded(model, ids: list[list[int]]) -> torch.Tensor:
    src = torch.full((len(ids), max(len(s) for s in ids)), model.config.eos_id, dtype=torch.long)
    for row, s in enumerate(ids):
        src[row, : len(s)] = torch.tensor(s)
    return src.to(model.device)


def _until_end(model, row: list[int]) -> list[int]:
    eos = model.config.eos_id
    return row[: row.index(eos)] if eos in row else row


@torch.no_grad()
def sample_targets(model, sources: list[list[int]], params: SamplingParams, dtype=torch.float32) -> list[list[int]]:
    """One target per source, each token chosen by :func:`choose` (the most likely one at temperature 0)."""
    if params.adjusted:  # (ignored before)
        raise FournilError("penalties and logit biases are for continuing a text: a seq2seq model's target is chosen "
                           "by temperature, top-k, top-p and min-p")
    generator = torch.Generator(model.device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    cfg = model.config
    with autocast(model.device, dtype):
        memory, mask = model.encode(_padded(model, sources))
        cache, tokens = model.new_cache(), torch.full((len(sources), 1), cfg.bos_id, device=model.device)
        done = torch.zeros(len(sources), dtype=torch.bool, device=model.device)
        for _ in range(min(params.max_new_tokens, cfg.block_size - 1)):
            logits = model.decode(tokens[:, -1:], memory, mask, cache)[:, -1].float()
            nxt = torch.where(done, cfg.eos_id, choose(logits, params, generator))
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
    return [_until_end(model, row[1:]) for row in tokens.tolist()]


def encoded_source(model, tokenizer, source: str) -> list[int]:
    """One source's ids, checked: some token the model knows, within its context."""
    ids = tokenizer.encode(source, strict=False)
    if not ids:
        raise FournilError(f"the source {source!r} has no token the model knows: give one like those it was trained on")
    if len(ids) > model.config.block_size:
        raise FournilError(f"the source has {len(ids)} tokens; the model's context is {model.config.block_size}: "
                           "give a shorter one")
    return ids


def written(model, source: list[int], dtype=torch.float32) -> list[int]:
    """The target greedy decoding writes for one source, framed as the decoder reads it: the start token, the
    tokens, then the end token, unless the context cut the target first."""
    params, cfg = SamplingParams(temperature=0), model.config
    tokens = sample_targets(model, [source], params, dtype)[0]
    ended = len(tokens) < min(params.max_new_tokens, cfg.block_size - 1)
    return [cfg.bos_id, *tokens, *[cfg.eos_id] * ended]


@torch.no_grad()
def beam_search(model, sources: list[list[int]], width: int = 4, dtype=torch.float32,
                longest: int | None = None) -> list[list[int]]:
    """The target of highest log-probability per token among ``width`` hypotheses kept at each step, of at most
    ``longest`` tokens (by default, as many as the context holds)."""
    cfg, device = model.config, model.device
    B = len(sources)
    with autocast(device, dtype):
        memory, mask = model.encode(_padded(model, sources))
        memory, mask = memory.repeat_interleave(width, 0), mask.repeat_interleave(width, 0)
        cache, tokens = model.new_cache(), torch.full((B * width, 1), cfg.bos_id, device=device)
        scores = torch.full((B, width), float("-inf"), device=device)
        scores[:, 0] = 0.0  # every hypothesis starts the same: keep one until they differ
        finished = torch.zeros(B * width, dtype=torch.bool, device=device)
        for _ in range(min(longest or cfg.block_size, cfg.block_size - 1)):
            logprobs = model.decode(tokens[:, -1:], memory, mask, cache)[:, -1].float().log_softmax(-1)
            logprobs[finished] = float("-inf")
            logprobs[finished, cfg.eos_id] = 0.0  # a finished hypothesis carries on unchanged
            V = logprobs.shape[-1]
            scores, picked = (scores.view(-1, 1) + logprobs).view(B, width * V).topk(width, -1)
            origin = (torch.arange(B, device=device)[:, None] * width + picked // V).view(-1)
            tokens = torch.cat([tokens[origin], (picked % V).view(-1, 1)], 1)
            for layer in cache:
                layer[:] = [t[origin] for t in layer]
            finished = finished[origin] | (tokens[:, -1] == cfg.eos_id)
            if finished.all():
                break
    rows = [_until_end(model, row[1:]) for row in tokens.tolist()]
    lengths = torch.tensor([len(r) + 1 for r in rows], device=device).view(B, width)  # the end token counts
    best = (scores / lengths).argmax(-1).tolist()
    return [rows[b * width + k] for b, k in enumerate(best)]


def generate_targets(model, tokenizer, sources: list[str], params: SamplingParams | None = None, beam: int = 1,
                     dtype=torch.float32, batch_size: int = 256) -> list[str]:
    """The model's target text for each source: sampled (``params``; greedy by default) or by beam search."""
    params = params or SamplingParams(temperature=0)
    out = []
    for start in range(0, len(sources), batch_size):
        ids = [encoded_source(model, tokenizer, s) for s in sources[start : start + batch_size]]
        rows = beam_search(model, ids, beam, dtype, params.max_new_tokens) if beam > 1 else \
            sample_targets(model, ids, params, dtype)
        out += [tokenizer.decode(r) for r in rows]
    return out
