"""Sampling controls: how the next token is chosen from the model's logits."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fournil.config import check_types, fits
from fournil.errors import FournilError

GREEDY_BELOW = 1e-5  # a temperature this close to 0 is greedy (dividing by it would overflow to inf, then NaN)
NUCLEUS_FIRST = 256  # top-p looks among this many most likely tokens first


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 (or below 1e-5) picks the most likely token (greedy)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens holding this much probability
    min_p: float | None = None  # keep tokens at least this fraction as likely as the most likely one
    repetition_penalty: float = 1.0  # > 1 makes tokens of the prompt and the answer less likely (CTRL's rule)
    frequency_penalty: float = 0.0  # subtracted from a logit once per time the token was generated (OpenAI's rule)
    presence_penalty: float = 0.0  # subtracted once if the token was generated at all
    seed: int | None = None  # the same seed, prompt and settings give the same text
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings
    logprobs: int | None = None  # also report the log-probabilities of this many most likely alternatives
    ignore_eos: bool = False  # go on past the end-of-text token, to max_new_tokens (for benchmarks)
    logit_bias: dict[int, float] | None = None  # added to these tokens' scores (OpenAI's: -100 bans one, 100 forces it)

    @property
    def adjusted(self) -> bool:
        """Whether penalties or biases change the model's scores before a token is chosen (penalties: as the answer
        grows)."""
        penalized = self.repetition_penalty != 1.0 or bool(self.frequency_penalty or self.presence_penalty)
        return penalized or bool(self.logit_bias)

    def check(self) -> None:
        check_types(SamplingParams, vars(self), "sampling")  # (the Python API's seed="a" failed deep in torch)
        if self.max_new_tokens < 1:
            raise FournilError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:  # (NaN too, which no comparison lets through)
            raise FournilError(f"--temperature must be 0 (greedy) or more (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise FournilError(f"--top-k must be at least 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FournilError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise FournilError(f"--min-p must be in [0, 1] (got {self.min_p})")
        if not 0.01 <= self.repetition_penalty <= 100:  # (a score divided by 1e-308 overflows: no token is drawn)
            raise FournilError(f"--repetition-penalty must be between 0.01 and 100, 1 for none, above 1 to repeat less "
                               f"(got {self.repetition_penalty})")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            raise FournilError("frequency and presence penalties must be between -2 and 2, as in the OpenAI API")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise FournilError(f"--seed must fit in 64 bits (got {self.seed})")
        if self.logprobs is not None and self.logprobs < 0:
            raise FournilError(f"logprobs must be 0 or more (got {self.logprobs})")
        if self.logit_bias is not None and not (isinstance(self.logit_bias, dict) and all(
                fits(int, i) and i >= 0 and fits(float, b) and -100 <= b <= 100 for i, b in self.logit_bias.items())):
            raise FournilError(f"logit_bias maps token ids to a bias from -100 to 100, e.g. {{42: -100}} (got "
                               f"{self.logit_bias!r})")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Logits reshaped by temperature, then cut to the top-k tokens, to the smallest set holding top-p mass, and
    to tokens at least min-p times as likely as the best."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:  # (1: every token, whatever the rounding of their sum)
        logits = logits.masked_fill(~nucleus(logits.softmax(-1), top_p), float("-inf"))
    if min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of the most likely tokens whose mass reaches ``top_p``, as a mask: the most likely tokens are
    taken in turn until the mass before them reaches it, and the most likely always. The first 256 mostly hold it;
    all are sorted only if they do not (for SmolLM2's 49,152, on a CPU: 0.07 ms against 3)."""
    k = min(NUCLEUS_FIRST, probs.shape[-1])
    top, order = probs.topk(k)
    if k < probs.shape[-1] and not bool((top.sum(-1) >= top_p).all()):
        top, order = probs.sort(-1, descending=True)
    drop = top.cumsum(-1) - top >= top_p
    drop[..., 0] = False  # (a top_p below float32's smallest number is 0)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, ~drop)


def penalize(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Repetition penalty over tokens ``seen`` in prompt or answer; frequency and presence penalties over the
    ``counts`` of tokens generated so far; then the biases of tokens."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if p.frequency_penalty or p.presence_penalty:
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if p.logit_bias:  # (last: a token banned stays banned, whatever the penalties do)
        ids, biases = (torch.tensor(list(v), device=logits.device) for v in (p.logit_bias, p.logit_bias.values()))
        logits = logits.index_add(-1, ids, biases.float().expand(*logits.shape[:-1], -1))
    return logits


def most_likely_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token (the first of equals), on a CPU by NumPy's vectorized argmax: PyTorch's took
    0.18 ms for 8 rows of SmolLM2's 49,152 scores, NumPy's 0.03."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def log_normalizers(logits: torch.Tensor) -> list[float]:
    """Each row's log of the sum of its exponentiated scores (a token's log-probability is its score minus it): a
    row's first score less its log-probability, since PyTorch's log-softmax on a CPU takes half the time of its
    logsumexp (8 rows of SmolLM2's 49,152 scores: 0.21 ms against 0.43)."""
    return (logits[:, 0] - logits.log_softmax(-1)[:, 0]).tolist()


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A token drawn from each row of ``probs`` (the last dimension, which need not sum to 1): the first whose running
    sum, in fp64, exceeds a uniform number times the row's total. One number per row, where ``torch.multinomial``
    draws one per token: a row of SmolLM2's 49,152 probabilities took 0.8 ms so on a CPU, 0.1 this way."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    if not bool(((total > 0) & total.isfinite()).all()):
        raise FournilError("the model's scores hold NaN or infinity, so no token can be drawn from them: its weights "
                           "are broken, or overflow in this precision (try --dtype float32)")
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=cdf.device) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def choose(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The next token of every row: the most likely at temperature 0, else drawn from the filtered distribution."""
    if p.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    return draw(filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1), generator)
