"""Speculative decoding: a small draft model proposes ``k`` tokens, the target model checks them all in one pass.

A decoding step of a small model on a CPU costs about as much as reading its weights once, however few tokens it
reads; the target reading k + 1 tokens in one pass costs little more than reading one. When the draft guesses well,
each target pass yields several tokens. The text is the target's own (Leviathan et al. 2023; Chen et al. 2023):

- greedy: each draft token is kept while it is the target's most likely one; at the first that is not, the target's
  choice replaces it; if all k are kept, the target's next choice comes free;
- sampled: draft token x, drawn from the draft's distribution q, is kept with probability min(1, p(x) / q(x)), p the
  target's; the first one refused is replaced by a draw from the normalized max(0, p - q). Every token then follows
  p exactly, whatever the draft (temperature, top-k, top-p and min-p shape p and q alike).

One sequence at a time (``fournil generate``, ``fournil chat``; the server's scheduler while a request is alone): both
models keep a key/value cache of the sequence, and after each check both caches forget the refused tokens.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fournil.device import autocast
from fournil.errors import FournilError
from fournil.generate.sampling import GREEDY_BELOW, SamplingParams, draw, filter_logits
from fournil.generate.scheduler import Piece
from fournil.generate.text import TextStream


@dataclass
class Speculation:
    """What the draft saved: target passes, and the tokens they yielded."""
    passes: int = 0
    tokens: int = 0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.passes, 1)


def check_draft(target_run, draft_run) -> None:
    """Refuse a draft that cannot propose the target's tokens."""
    from fournil.train.distill import same_tokenizer

    if not hasattr(draft_run.model, "new_cache") or not hasattr(target_run.model, "new_cache"):
        raise FournilError("speculative decoding needs Transformer decoders (gpt, llama, a pretrained model) as target "
                           "and draft")
    if not same_tokenizer(target_run.tokenizer, draft_run.tokenizer):
        raise FournilError(f"the draft's tokenizer ({draft_run.tokenizer.vocab_size:,} tokens) is not the target's "
                           f"({target_run.tokenizer.vocab_size:,}): a draft must propose the target's tokens, e.g. the "
                           f"layers:N student fournil distill makes of it")


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities tokens are drawn from (one-hot on the most likely one when greedy)."""
    if params.temperature < GREEDY_BELOW:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)


def verify(proposed: list[int], q: list[torch.Tensor], logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """The tokens the target keeps of a draft's ``proposed`` ones (drawn from the distributions ``q``), given its
    ``logits`` after the last kept token and after each proposal: the proposals up to the first refused one, then the
    target's own choice in its place (or after all of them)."""
    kept = []
    for i, token in enumerate(proposed):
        p = distribution(logits[i], params)
        if float(torch.rand(1, generator=generator, device=logits.device)) * q[i][token] < p[token]:
            kept.append(token)  # with probability min(1, p/q) (greedy: when both choose it)
            continue
        rest = (p - q[i]).clamp(min=0)
        kept.append(int(draw(rest, generator)) if rest.sum() > 0 else int(p.argmax()))
        return kept
    kept.append(int(draw(distribution(logits[len(proposed)], params), generator)))
    return kept


def propose(draft_logits, feed, params: SamplingParams, generator: torch.Generator, ahead: int):
    """``ahead`` tokens drawn from the draft, and the distribution each was drawn from: ``draft_logits`` after what
    it has read, ``feed(token)`` its logits after one more token."""
    proposed, q = [], []
    logits = draft_logits
    for i in range(ahead):
        q.append(distribution(logits, params))
        proposed.append(int(draw(q[-1], generator)))
        if i + 1 < ahead:
            logits = feed(proposed[-1])
    return proposed, q


def check_draft_tokens(k: int) -> None:
    if k < 1:
        raise FournilError(f"--draft-tokens must be at least 1 (got {k})")


def speculate(target, draft, tokenizer, prompt: list[int], params: SamplingParams, dtype: torch.dtype = torch.float32,
              k: int = 4, stats: Speculation | None = None) -> Iterator[Piece]:
    """The target's answer to ``prompt``, a piece at a time, with ``draft`` proposing ``k`` tokens per target pass
    (counted in ``stats``). The prompt and settings are checked now, before any piece."""
    params.check()
    if params.penalized:  # a draft cannot propose from a distribution that changes as the answer grows
        raise FournilError("penalties change the distribution as the answer grows: not with a draft model")
    check_draft_tokens(k)
    block = min(target.config.block_size, draft.config.block_size)
    if not prompt or len(prompt) >= block:
        raise FournilError(f"the prompt has {len(prompt)} tokens; it needs at least one, and fewer than the context "
                           f"of {block}")
    return _pieces(target, draft, tokenizer, prompt, params, dtype, k, block,
                   stats if stats is not None else Speculation())


@torch.no_grad()
def _pieces(target, draft, tokenizer, prompt, params, dtype, k, block, stats) -> Iterator[Piece]:
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
    text = TextStream(tokenizer, params.stop, () if params.ignore_eos else None)
    size = min(block, len(prompt) + params.max_new_tokens + k + 1)
    models = {"target": target, "draft": draft}  # by role: a draft may be the target itself
    caches = {role: m.new_cache(1, size, dtype) for role, m in models.items()}
    context = list(prompt)
    read = {"target": 0, "draft": 0}  # tokens of ``context`` each cache holds

    def feed(role: str, tokens: list[int]) -> torch.Tensor:
        """Logits after each of ``tokens``, which continue what the cache of ``role`` holds."""
        logits = models[role](torch.tensor([tokens], device=device), caches[role])[0].float()
        read[role] += len(tokens)
        return logits

    def forget(role: str, n: int) -> None:
        caches[role].length = read[role] = n

    for m in (target, draft):
        m.eval()
    generated = 0
    with autocast(device, dtype):
        if len(context) > 1:
            feed("target", context[:-1])
            feed("draft", context[:-1])
        while True:
            ahead = min(k, params.max_new_tokens - generated - 1, block - len(context) - 1)
            proposed, q = [], []
            if ahead > 0:  # the draft reads what it has not seen, then proposes ``ahead`` tokens
                proposed, q = propose(feed("draft", context[read["draft"]:])[-1],
                                      lambda token: feed("draft", [token])[-1], params, generator, ahead)
            logits = feed("target", context[read["target"]:] + proposed)  # the last len(proposed) + 1 positions matter
            logits = logits[len(logits) - len(proposed) - 1:]
            stats.passes += 1
            kept = verify(proposed, q, logits, params, generator)
            # both caches forget what was not kept (the target holds all but the last token of the context)
            forget("target", len(context) + len(kept) - 1)
            forget("draft", min(read["draft"], len(context) + len(kept) - 1))
            for token, row in zip(kept, logits):
                stats.tokens += 1
                generated += 1
                context.append(token)
                piece = text.feed(token)
                if text.at_stop_token:
                    if piece:
                        yield Piece(piece, -1, 0.0)
                    return
                yield Piece(piece, token, float(row.log_softmax(-1)[token]))
                if text.done:
                    return
                if generated == params.max_new_tokens or len(context) >= block:
                    if rest := text.finish():
                        yield Piece(rest, -1, 0.0)
                    return
