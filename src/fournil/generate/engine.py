"""The generation engine: every command that produces text (sample, generate, chat, the server) goes through here.

Whole answers for several prompts (:func:`complete`), one answer a piece at a time (:func:`stream`; with a draft
model proposing tokens, :func:`speculate`), the likelihood of a given text (:func:`score`) and of several
continuations of one prefix (:func:`score_choices`). Generation itself is the scheduler's: prompts of any lengths
read in one pass into a key/value cache, then extended one token per step for all of them at once.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fournil.device import autocast, memory_budget
from fournil.errors import FournilError
from fournil.generate.cache import half_context
from fournil.generate.sampling import SamplingParams
from fournil.generate.scheduler import Piece, Scheduler
from fournil.generate.speculative import Speculation, check_drafting
from fournil.models.base import decoder_only


@dataclass
class Completion:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # per token, when logprobs were asked for
    finish_reason: str = "length"  # "stop": a stop token or string ended it; "length": max_new_tokens did
    stop_token: int | None = None  # the stop token that ended it (not part of ``tokens``), if one did


def row_params(params: SamplingParams, row: int) -> SamplingParams:
    """The settings of one of several answers to the same request: a seed of its own, so that they differ."""
    if params.seed is None or row == 0:
        return params
    return SamplingParams(**{**vars(params), "seed": (params.seed * 1_000_003 + row) % 2**63})


def complete(model, tokenizer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             dtype: torch.dtype = torch.float32, truncate: bool = False, max_batch: int | None = None,
             progress=None) -> list[Completion]:
    """Whole answers for several prompts, generated together (``max_batch`` at a time; by default as many as
    :func:`batch_rows` allows); ``params`` for all (each answer then gets a seed of its own) or one per prompt.
    ``progress(n)``: after each step, with the number of answers finished so far."""
    if not isinstance(params, list):
        params.check()  # before the rows' seeds are derived from its seed
    each = params if isinstance(params, list) else [row_params(params, i) for i in range(len(prompts))]
    scheduler = Scheduler(model, tokenizer, dtype, max_batch=max_batch or batch_rows(model, prompts, each, dtype),
                          max_waiting=len(prompts), truncate=truncate)
    requests = [scheduler.submit(p, sp) for p, sp in zip(prompts, each)]
    while scheduler.step():
        if progress:
            progress(sum(r.done for r in requests))
    out = []
    for r in requests:
        c = Completion(finish_reason=r.finish_reason, stop_token=r.context[-1] if r.text.at_stop_token else None)
        for piece in r:
            c.text += piece.text
            if piece.token >= 0:
                c.tokens.append(piece.token)
                c.logprobs.append(piece.logprob)
                if piece.top is not None:
                    c.top.append(piece.top)
        out.append(c)
    return out


def batch_rows(model, prompts: list[list[int]], params: list[SamplingParams], dtype: torch.dtype) -> int:
    """How many answers :func:`complete` generates together by default: all, unless their key/value cache would
    outgrow the device's :func:`memory_budget` (the others wait for a row to free). The teacher's 200 answers of
    sequence-level distillation, SmolLM2 in fp32 on a 2-core CPU: 224-246 tokens/s and a peak of 5.9-6.3 GB all at
    once, 263 tokens/s and 2.4 GB 77 at a time, as this gives (2,000 at once would not fit in 24 GB)."""
    if not hasattr(model, "new_cache") or not prompts:
        return max(1, len(prompts))
    one = model.new_cache(1, 1, dtype)
    per_token = sum(t.numel() * t.element_size() for t in one.k + one.v)
    if not per_token:  # a transformer of no layers keeps nothing
        return len(prompts)
    longest = min(model.config.block_size, max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params)))
    return max(1, min(len(prompts), memory_budget(model.device) // (per_token * longest)))


def stream(model, tokenizer, prompt: list[int], params: SamplingParams, dtype: torch.dtype = torch.float32,
           truncate: bool = False, scheduler: Scheduler | None = None) -> Iterator[Piece]:
    """One answer, a piece at a time, as it is generated; the prompt and settings are checked now, before any piece.
    ``scheduler``: one of a single row to go on with (a conversation's, which keeps its last answer), not a new one."""
    scheduler = scheduler or Scheduler(model, tokenizer, dtype, max_batch=1, max_waiting=1, truncate=truncate)
    request = scheduler.submit(prompt, params)

    def pieces():
        try:
            while True:
                scheduler.step()
                while not request.pieces.empty():
                    piece = request.pieces.get()
                    if piece is None:
                        return
                    yield piece
        finally:
            request.cancel()  # a reader that stops early frees the row for the next answer
            scheduler.release_weights()  # the model's own weights back, even if no step follows

    return pieces()


def speculate(model, draft, tokenizer, prompt: list[int], params: SamplingParams, dtype: torch.dtype = torch.float32,
              k: int = 4, stats: Speculation | None = None, draft_dtype: torch.dtype | None = None) -> Iterator[Piece]:
    """:func:`stream`, with ``draft`` (computing in ``draft_dtype``, by default ``dtype``) proposing ``k`` tokens for
    each pass of the model (counted in ``stats``): the model's own answer (:mod:`fournil.generate.speculative`), in
    fewer of its passes."""
    params.check()
    check_drafting(params, k)
    scheduler = Scheduler(model, tokenizer, dtype, max_batch=1, max_waiting=1, draft=draft, draft_tokens=k,
                          draft_dtype=draft_dtype)
    scheduler.speculation = stats if stats is not None else scheduler.speculation
    return stream(model, tokenizer, prompt, params, dtype, scheduler=scheduler)


@torch.no_grad()
def score(model, ids: list[int], start: int = 1, dtype: torch.dtype = torch.float32, top: int = 0) -> list:
    """The log-probability of each token ``ids[start:]`` given the tokens before it: the likelihood of a text. With
    ``top``, each comes as a pair with the ``top`` most likely tokens at its place, ``{token: log-probability}``.
    A text longer than the model's context is read in windows of the context, each half a context after the last:
    each token is predicted from at least half a context before it."""
    decoder_only(model, "scoring a text")
    if not 1 <= start <= len(ids):
        raise FournilError("score needs at least one token of context before the scored ones")
    block, was_training = model.config.block_size, model.training
    model.eval()
    try:
        windows, first = [], start  # (the first token not scored yet)
        while first < len(ids):
            last = min(len(ids), max(block + 1, first + half_context(block)))  # (the window scores up to ids[last - 1])
            begin = max(0, last - 1 - block)
            with autocast(model.device, dtype):
                logits = model(torch.tensor([ids[begin:last - 1]], device=model.device))[0, first - 1 - begin:]
            windows.append(logits.float().log_softmax(-1))
            first = last
        if not windows:
            return []
        return picked(torch.cat(windows), ids[start:], top)
    finally:
        model.train(was_training)


def picked(logprobs: torch.Tensor, ids: list[int], top: int = 0) -> list:
    """The log-probability of each of ``ids`` in its row of ``logprobs``; with ``top``, each as a pair with the
    ``top`` most likely tokens of its row, ``{token: log-probability}``."""
    chosen = logprobs.gather(-1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if not top:
        return chosen
    values, alternatives = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return [(p, dict(zip(i.tolist(), v.tolist()))) for p, v, i in zip(chosen, values, alternatives)]


@torch.no_grad()
def score_choices(model, packs: list[tuple[list[int], list[tuple[list[int], list[int]]]]],
                  dtype: torch.dtype = torch.float32) -> list[list[tuple[float, bool]]]:
    """Several continuations of a shared prefix scored in one pass, the prefix read once: each pack is a prefix and
    rows that go on from it (a row's tokens, whose last ones are the continuation scored), packed in one sequence
    where each row sees the prefix and itself only (:class:`Packed`). For each pack, each row's (log-probability of
    its continuation, whether greedy decoding writes it). Multiple-choice benchmarks and judges choose this way."""
    from fournil.generate.cache import Packed
    from fournil.models.base import chunk_positions

    device = model.device
    layout = Packed([(len(prefix), [len(inp) for inp, _ in rows]) for prefix, rows in packs],
                    getattr(model.config, "sliding_window", None), device)
    ids = [prefix + [t for inp, _ in rows for t in inp] for prefix, rows in packs]
    width = max(map(len, ids))
    at_row, at_col, wanted = [], [], []
    for r, (prefix, rows) in enumerate(packs):
        end = len(prefix)
        for inp, cont in rows:
            end += len(inp)
            at_row += [r] * len(cont)
            at_col += range(end - len(cont), end)
            wanted += cont
    at_row, at_col, wanted = (torch.tensor(t, device=device) for t in (at_row, at_col, wanted))
    was_training = model.training
    model.eval()
    try:
        with autocast(device, dtype):
            states = model.hidden(torch.tensor([row + [0] * (width - len(row)) for row in ids], device=device), layout)
            picked, greedy = [], []
            step = chunk_positions(model.config.vocab_size)  # the output layer a bounded number of positions at once
            for i in range(0, len(wanted), step):
                logprobs = model.lm_head(states[at_row[i:i + step], at_col[i:i + step]]).float().log_softmax(-1)
                picked.append(logprobs.gather(-1, wanted[i:i + step, None])[:, 0])
                greedy.append(logprobs.argmax(-1) == wanted[i:i + step])
    finally:
        model.train(was_training)
    picked, greedy = torch.cat(picked).tolist(), torch.cat(greedy).tolist()
    out, at = [], 0
    for _, rows in packs:
        out.append([])
        for _, cont in rows:
            out[-1].append((sum(picked[at:at + len(cont)]), all(greedy[at:at + len(cont)])))
            at += len(cont)
    return out
