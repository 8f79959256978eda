"""The generation engine: every command that produces text (sample, generate, chat, the server) goes through here.

Prompts of any lengths are generated together: padded on the left, read in one pass (prefill) into a preallocated
key/value cache, then extended one token per step for all rows at once. A model without a cache (n-gram, MLP,
RNN) reads its whole context again at each step. When a long text fills the model's context, generation goes on
from the last half of it (the cache is refilled from there).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fournil.device import autocast
from fournil.errors import FournilError
from fournil.generate.sampling import SamplingParams, choose, penalize


@dataclass
class Step:
    """One generated token per row, with its log-probability under the model and, if asked, the top alternatives."""

    tokens: torch.Tensor  # (B,)
    logprobs: torch.Tensor  # (B,)
    top_ids: torch.Tensor | None = None  # (B, n)
    top_logprobs: torch.Tensor | None = None


def check_prompts(model, prompts: list[list[int]], truncate: bool) -> list[list[int]]:
    block = model.config.block_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FournilError("every prompt needs at least one token")
    longest = max(map(len, prompts))
    if longest >= block:
        if not truncate:
            raise FournilError(f"the prompt has {longest} tokens; the model's context is {block}: shorten it "
                               f"(or let fournil keep its last {block - 1} tokens)")
        prompts = [p[-(block - 1):] for p in prompts]
    return prompts


class Batch:
    """Rows of tokens and the model state that continues them: a key/value cache, or the tokens alone."""

    def __init__(self, model, rows: list[list[int]], dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.cached = hasattr(model, "new_cache")
        if not self.cached and len({len(r) for r in rows}) > 1:
            raise FournilError(f"the {model.family} model generates prompts of one length at a time")
        self.rows = [list(r) for r in rows]

    def prefill(self, size: int) -> torch.Tensor:
        """Read every row (left-padded) into a fresh cache of ``size`` slots; logits for each row's next token."""
        device, width = self.model.device, max(map(len, self.rows))
        x = torch.zeros(len(self.rows), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(self.rows), width, dtype=torch.bool, device=device)
        for i, r in enumerate(self.rows):
            x[i, width - len(r):] = torch.tensor(r, device=device)
            valid[i, width - len(r):] = True
        self.cache = self.model.new_cache(len(self.rows), size, self.dtype)
        return self.model(x, self.cache, valid)[:, -1]

    def start(self, budget: int) -> torch.Tensor:
        if not self.cached:
            return self.logits()
        return self.prefill(min(self.model.config.block_size, max(map(len, self.rows)) + budget))

    def logits(self) -> torch.Tensor:
        block = self.model.config.block_size
        return self.model(torch.tensor([r[-block:] for r in self.rows], device=self.model.device))[:, -1]

    def extend(self, tokens: torch.Tensor, remaining: int) -> torch.Tensor:
        """Append one token to every row; logits for the next one."""
        for r, t in zip(self.rows, tokens.tolist()):
            r.append(t)
        if not self.cached:
            return self.logits()
        if self.cache.length == self.cache.size:  # the context is full: go on from its last half
            block = self.model.config.block_size
            self.rows = [r[-(block // 2):] for r in self.rows]
            return self.prefill(min(block, block // 2 + remaining))
        return self.model(tokens[:, None], self.cache)[:, -1]


@torch.no_grad()
def generate_steps(model, prompts: list[list[int]], params: SamplingParams, dtype: torch.dtype = torch.float32,
                   truncate: bool = False) -> Iterator[Step]:
    """The one generation loop: yields a :class:`Step` for every row at each step; the caller stops iterating."""
    params.check()
    prompts = check_prompts(model, prompts, truncate)
    was_training = model.training
    model.eval()
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
    vocab = model.config.vocab_size
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p, device=device)] = True
    counts = torch.zeros(len(prompts), vocab, device=device)
    batch = Batch(model, prompts, dtype)
    try:
        with autocast(device, dtype):
            logits = batch.start(params.max_new_tokens)
        for n in range(params.max_new_tokens):
            logprobs = logits.float().log_softmax(-1)
            token = choose(penalize(logits, seen, counts, params), params, generator)
            step = Step(token, logprobs.gather(-1, token[:, None])[:, 0])
            if params.logprobs:
                step.top_logprobs, step.top_ids = logprobs.topk(min(params.logprobs, vocab), dim=-1)
            yield step
            seen[torch.arange(len(prompts)), token] = True
            counts[torch.arange(len(prompts)), token] += 1
            if n + 1 < params.max_new_tokens:
                with autocast(device, dtype):
                    logits = batch.extend(token, params.max_new_tokens - n - 1)
    finally:
        model.train(was_training)


@dataclass
class Completion:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # per token, when logprobs were asked for
    finish_reason: str = "length"  # "stop": a stop token or string ended it; "length": max_new_tokens did


class TextStream:
    """Tokens to text for one row: waits for the last byte of a split character, holds back text that could be the
    start of a stop string, and ends at a stop token or before a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.stop_ids = tokenizer.stop_ids
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already given out
        self.text = ""
        self.done = False
        self.at_stop_token = False  # the answer ended with a stop token, which is not part of it

    def feed(self, token: int) -> str:
        """The new text this token makes safe to show (maybe none); sets ``done`` when the answer ends."""
        if token in self.stop_ids:
            self.done = self.at_stop_token = True
            return self._release(len(self.text))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            return ""
        self.text = text
        cuts = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.done = True
            self.text = text[: min(cuts)]
            return self._release(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(len(text) - hold)

    def finish(self) -> str:
        """What was held back, when the answer ends by length."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def complete(model, tokenizer, prompts: list[list[int]], params: SamplingParams, dtype: torch.dtype = torch.float32,
             truncate: bool = False) -> list[Completion]:
    """Whole answers for several prompts, generated together."""
    out = [Completion() for _ in prompts]
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    for step in generate_steps(model, prompts, params, dtype, truncate):
        for i, (c, s) in enumerate(zip(out, streams)):
            if s.done:
                continue
            token = int(step.tokens[i])
            c.text += s.feed(token)
            if s.at_stop_token:
                c.finish_reason = "stop"
                continue
            c.tokens.append(token)
            c.logprobs.append(float(step.logprobs[i]))
            if step.top_ids is not None:
                c.top.append(dict(zip(step.top_ids[i].tolist(), step.top_logprobs[i].tolist())))
            if s.done:
                c.finish_reason = "stop"
        if all(s.done for s in streams):
            break
    for c, s in zip(out, streams):
        if not s.done:
            c.text += s.finish()
    return out


@dataclass
class Piece:
    text: str  # the text this token adds (may be empty while a character or a possible stop string is pending)
    token: int  # -1 for the held-back text released when the answer ends by length
    logprob: float
    top: dict[int, float] | None = None


def stream(model, tokenizer, prompt: list[int], params: SamplingParams, dtype: torch.dtype = torch.float32,
           truncate: bool = False) -> Iterator[Piece]:
    """One answer, a token at a time, as it is generated."""
    text = TextStream(tokenizer, params.stop)
    for step in generate_steps(model, [prompt], params, dtype, truncate):
        token = int(step.tokens[0])
        piece = text.feed(token)
        if text.at_stop_token:
            if piece:
                yield Piece(piece, token, float(step.logprobs[0]))
            return
        top = dict(zip(step.top_ids[0].tolist(), step.top_logprobs[0].tolist())) if step.top_ids is not None else None
        yield Piece(piece, token, float(step.logprobs[0]), top)
        if text.done:
            return
    rest = text.finish()
    if rest:
        yield Piece(rest, -1, 0.0)


@torch.no_grad()
def score(model, ids: list[int], start: int = 1, dtype: torch.dtype = torch.float32) -> list[float]:
    """The log-probability of each token ``ids[start:]`` given the tokens before it: the likelihood of a text."""
    if len(ids) > model.config.block_size:
        raise FournilError(f"{len(ids)} tokens do not fit the model's context of {model.config.block_size}")
    if not 1 <= start <= len(ids):
        raise FournilError("score needs at least one token of context before the scored ones")
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=model.device)
        logprobs = model(x)[0, :-1].float().log_softmax(-1)
        picked = logprobs.gather(-1, x[0, 1:, None])[:, 0]
        return picked[start - 1 :].tolist()
    finally:
        model.train(was_training)
