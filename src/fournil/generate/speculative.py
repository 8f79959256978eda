"""Speculative decoding: a small draft model proposes ``k`` tokens, the target model checks them all in one pass.

A decoding step of a small model on a CPU costs about as much as reading its weights once, however few tokens it
reads; the target reading k + 1 tokens in one pass costs little more than reading one. When the draft guesses well,
each target pass yields several tokens. The text is the target's own (Leviathan et al. 2023; Chen et al. 2023):

- greedy: each draft token is kept while it is the target's most likely one; at the first that is not, the target's
  choice replaces it; if all k are kept, the target's next choice comes free;
- sampled: draft token x, drawn from the draft's distribution q, is kept with probability min(1, p(x) / q(x)), p the
  target's; the first one refused is replaced by a draw from the normalized max(0, p - q). Every token then follows
  p exactly, whatever the draft (temperature, top-k, top-p and min-p shape p and q alike).

The scheduler decodes so a sequence that is alone (:meth:`fournil.generate.Scheduler._speculate`; ``fournil generate``
and ``fournil chat`` through :func:`fournil.generate.engine.speculate`, a server's requests while one runs): both
models keep a key/value cache of the sequence, and after each check both caches forget the refused tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fournil.errors import FournilError
from fournil.generate.sampling import GREEDY_BELOW, SamplingParams, draw, filter_logits


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

    if any(r.model.family == "seq2seq" or not hasattr(r.model, "new_cache") for r in (target_run, draft_run)):
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


def check_drafting(params: SamplingParams, k: int) -> None:
    """Refuse what a draft cannot propose for: penalties (a distribution that changes as the answer grows) and biases
    (which its own distribution does not have), or no tokens at all."""
    if params.adjusted:
        raise FournilError("logit biases are not applied to a draft's proposals: not with a draft model"
                           if params.logit_bias else "penalties change the distribution as the answer grows: not with "
                                                     "a draft model")
    check_draft_tokens(k)


def check_draft_tokens(k: int) -> None:
    if k < 1:
        raise FournilError(f"--draft-tokens must be at least 1 (got {k})")
