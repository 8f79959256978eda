"""Continuous batching: sequences join the running batch and leave it between steps, each with its own settings.

Every active sequence holds one row of a shared key/value cache, rows 0 to n-1, so that one forward pass extends them
all. A sequence joins by reading its prompt into a free row (prefill), its tokens ending at the column where the
others' end, after a copy of the longest prefix its prompt shares with a row already there (a system prompt, a
conversation's earlier turns, few-shot examples: read once; of prompts that arrive together, the first is read before
the others for this); it leaves by handing its row to the last active sequence. When the cache's columns run out,
every row is moved to end at the longest row's length (what left-over padding wasted is reclaimed), or the cache
grows, up to the model's context; a sequence whose own context is full goes on from the last half of it. Models
without a cache (n-gram, MLP, RNN) read each sequence's whole context at each step.

What a sequence computes then depends a little on its neighbours: the padding before it and the batch's size change
the order of floating-point sums, and in bf16 that can change a greedy choice. So the cache is emptied whenever no
sequence is left (a request to an idle scheduler is computed as if it were the first; one that ``keep``s a
conversation goes on from its last answer instead of reading it again), and ``batch_invariant`` keeps
each row as if it were alone (its tokens from column 0, its own forward pass each step): a sequence's tokens then do
not depend on what else runs, at the cost of one forward pass per sequence.

:class:`Scheduler` runs steps when asked (``step``), in a thread of its own (``start``), or, for a server, in the thread
that loaded the model (:func:`drive`, several schedulers in turn), where requests arrive from other threads through
``submit`` and are read as iterators of :class:`Piece`, and other work on the model comes through ``call``.

Why the loading thread: PyTorch's CPU kernels parallelize with OpenMP, and once two threads have each run parallel
work, GNU OpenMP manages more threads than there are cores and stops its workers from waiting actively; each
parallel region then pays to wake them. Measured on 2 cores: int8 and bf16 matrix-vector products 2.5-3 times as
slow, decoding at 0.6 times its speed. Every forward pass of a process in one thread avoids it.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from fournil.cores import computing
from fournil.device import autocast
from fournil.errors import FournilError
from fournil.generate.cache import Fixed, half_context
from fournil.generate.compiled import decoding_step, settle
from fournil.generate.sampling import (GREEDY_BELOW, SamplingParams, choose, log_normalizers, most_likely_tokens,
                                       penalize)
from fournil.generate.speculative import Speculation, propose, verify
from fournil.generate.text import TextStream
from fournil.models.base import decoder_only
from fournil.models.lora import LoRALinear

log = logging.getLogger("fournil.generate")

WORTH_A_PASS = 16  # prompt tokens a new request must share with another new one, beyond what it can copy from the
# rows in the cache, to wait for a second pass and copy them from that one's row
altered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # how many schedulers changed each model's weights
KEPT = -1  # where a request's shared prefix comes from when it is the kept sequence's (``keep``), not a row's


class Busy(FournilError):
    """Too many requests are waiting."""


@contextlib.contextmanager
def decoding_weights(model: nn.Module, dtype: torch.dtype):
    """Each linear layer's weight as the decoding steps multiply it, made once while a scheduler has sequences to
    generate instead of at every step: a LoRA adapter folded in (one product, not three), and fp32 weights cast to
    ``dtype`` when autocast computes in it (autocast casts them again at every step, and does not keep what it cast
    of frozen weights; a GPU's generation computes fp32 weights in bf16). The products are autocast's; embeddings,
    norms and the residual stream stay as they are. Generation owns the model meanwhile (GRPO's answers, a run's
    samples, a server's requests); a compiled step keeps the weights it read. SmolLM2 with a LoRA adapter, bf16
    autocast, 8 rows: 106-134 tokens/s when each step cast, 254-260 made once."""
    use_compiled_step(model)
    kept = []
    for m in model.modules() if decoding_step(model) is None else ():
        fold = isinstance(m, LoRALinear) and not m.disabled
        cast = isinstance(m, nn.Linear) and dtype != torch.float32 and m.weight.dtype == torch.float32
        if fold or cast:
            kept.append((m, m.weight, fold))
            weight = m.folded() if fold else m.weight.detach()
            m.weight = nn.Parameter(weight.to(dtype if cast else m.weight.dtype), requires_grad=False)
            if fold:
                m.disabled = True
    altered[model] = altered.get(model, 0) + bool(kept)
    try:
        yield
    finally:
        altered[model] -= bool(kept)
        for m, weight, fold in kept:
            m.weight = weight
            if fold:
                m.disabled = False


def use_compiled_step(model: nn.Module) -> None:
    """The decoding step compiled or loaded in the background for ``model``, from now on if it is ready and the
    weights are the model's own (it reads them as they were when it was compiled): a scheduler's thread looks while
    idle, and before each step."""
    if not altered.get(model):
        settle(model)


def check_capacity(max_batch: int, max_waiting: int) -> None:
    if max_batch < 1 or max_waiting < 0:
        raise FournilError(f"--max-batch must be at least 1 and --max-waiting at least 0 (got {max_batch} and "
                           f"{max_waiting}): a server with no row to generate in could never answer")


@dataclass
class Timings:
    """What a scheduler's work took (``GET /metrics`` shows it): its steps that ran the model, reading new prompts
    included, and the time from each request's arrival to its first token."""
    steps: int = 0
    step_seconds: float = 0.0
    first_tokens: int = 0
    first_token_seconds: float = 0.0


@dataclass
class Piece:
    text: str  # what this token adds to the answer (maybe empty while a character or a possible stop string is pending)
    token: int  # -1 for text held back until the answer ended, which no new token carries
    logprob: float
    top: dict[int, float] | None = None  # the most likely alternatives, when logprobs were asked for


@dataclass
class Request:
    """One sequence being generated; iterate over it for its pieces (in any thread), ``cancel`` to free its row."""

    prompt: list[int]
    params: SamplingParams
    text: TextStream
    generator: torch.Generator
    seen: torch.Tensor | None = None  # tokens of the prompt and the answer (for the repetition penalty), with
    # penalties only; made when the request joins the batch, in the thread that runs the steps (tensor work in a
    # client's thread costs: see top)
    counts: torch.Tensor | None = None  # times each token was generated (frequency and presence penalties)
    context: list[int] = field(default_factory=list)  # prompt and answer so far
    cached: int = 0  # how many tokens before the last one of ``context`` its cache row holds
    shared: int = 0  # how many of them it took from another row (a prefix of their prompts) instead of reading them
    generated: int = 0
    finish_reason: str | None = None  # "stop" (a stop token or string), "length" (max_new_tokens), "error" (a step
    # failed: the server's fault); None while running
    cancelled: bool = False
    draft_cache: object = None  # with a draft model, while alone: the draft's key/value cache of ``context``
    draft_read: int = 0  # how many tokens of ``context`` it holds
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # or any object with put()
    arrived: float = field(default_factory=time.perf_counter)  # when it was submitted (its first token's wait)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def __iter__(self):
        while (piece := self.pieces.get()) is not None:
            yield piece


class Scheduler:
    def __init__(self, model, tokenizer, dtype: torch.dtype = torch.float32, max_batch: int = 8,
                 max_waiting: int = 64, truncate: bool = False, first_columns: int = 32, batch_invariant: bool = False,
                 wake: threading.Condition | None = None, draft=None, draft_tokens: int = 4, keep: bool = False,
                 after_step=None, draft_dtype: torch.dtype | None = None):
        """``max_batch`` sequences are generated together, ``max_waiting`` more may queue; the cache starts
        ``first_columns`` wide and grows by a quarter when needed (a compiled step's attention in PyTorch attends to
        every column: starting at 256 cost 8 rows of SmolLM2 a fifth of their step, and doubling instead of a quarter
        about a tenth; fournil's CPU kernel reads only the columns in use).
        Schedulers driven together share ``wake``. With a ``draft`` model (of the same tokenizer), a sequence alone is
        decoded speculatively, ``draft_tokens`` proposed per pass (:mod:`fournil.generate.speculative`), the draft
        computing in ``draft_dtype`` (by default the model's: a draft in int8 computes in bf16 beside a model in fp32);
        sequences together, or with penalties, one token per pass. With ``keep`` (one conversation: ``fournil
        chat``), the keys and values of the last sequence to finish are kept, even while idle, for the next prompt that
        goes on from it: a conversation's next turn reads only its new tokens. ``after_step()`` is called after each
        step that :func:`drive` runs (a server sends the step's pieces on from there, together)."""
        check_capacity(max_batch, max_waiting)
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.first_columns, self.batch_invariant = first_columns, batch_invariant
        self.draft, self.draft_tokens, self.draft_dtype = draft, draft_tokens, draft_dtype or dtype
        self.speculation = Speculation()  # with a draft: the model's passes that checked proposals, and their tokens
        self.timings = Timings()
        self.max_batch, self.max_waiting, self.truncate, self.keep = max_batch, max_waiting, truncate, keep
        self.after_step = after_step
        self.kept: tuple[list[int], list[torch.Tensor]] | None = None  # with keep: tokens, their keys and values
        self.block = model.config.block_size
        self.cache = None
        self.held: contextlib.ExitStack | None = None  # while sequences run: the weights as steps multiply them
        self.active: list[Request] = []  # active[i] holds row i of the cache
        self.waiting: deque[Request] = deque()
        self.calls: deque[tuple] = deque()  # (function, arguments, future) to run between steps
        self.wake = wake or threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False

    # ---- requests (any thread)
    def submit(self, prompt: list[int], params: SamplingParams, sink=None) -> Request:
        """Queue a prompt; it joins the batch at the next step with a free row. Its pieces, then ``None``, go to
        ``sink.put`` (a queue of the request's own by default). Raises :class:`Busy` when the queue is full, and a
        :class:`FournilError` for a prompt or settings that cannot be generated."""
        decoder_only(self.model, "continuing a text")  # (a seq2seq model's scheduler runs only calls: a server's)
        params.check()
        if not prompt:
            raise FournilError("every prompt needs at least one token")
        if params.logit_bias and max(params.logit_bias) >= self.model.config.vocab_size:
            raise FournilError(f"logit_bias names token {max(params.logit_bias)}, outside this model's vocabulary (ids "
                               f"0 to {self.model.config.vocab_size - 1})")
        longest = max(1, self.block - 1)  # room for the answer (a context of 1 token: the token it answers)
        if len(prompt) > longest:
            if not self.truncate:
                raise FournilError(f"the prompt has {len(prompt)} tokens; the model's context is {self.block}: shorten "
                                   f"it to {longest} token{'s' * (longest > 1)} at most, to leave room for the answer")
            prompt = prompt[-longest:]
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        text = TextStream(self.tokenizer, params.stop, () if params.ignore_eos else None)
        request = Request(list(prompt), params, text, generator, context=list(prompt))
        if sink is not None:
            request.pieces = sink
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are already waiting; try again in a moment")
            self.waiting.append(request)
            self.wake.notify_all()
        return request

    def call(self, fn, *args) -> Future:
        """Run ``fn(*args)`` where the steps run, between two of them (other work on the model: scoring a prompt)."""
        future = Future()
        with self.wake:
            self.calls.append((fn, args, future))
            self.wake.notify_all()
        return future

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def pending(self) -> bool:
        """Whether a request or a call waits (what wakes an idle driver)."""
        return bool(self.waiting or self.calls or self.closing)

    # ---- the loop (one thread)
    def step(self) -> bool:
        """Admit waiting requests into free rows, then generate one token for every active sequence. Returns whether
        there is anything left to do."""
        with self.wake:
            while self.waiting and len(self.active) < self.max_batch:
                r = self.waiting.popleft()
                if r.cancelled:
                    r.pieces.put(None)
                else:
                    if r.params.adjusted:
                        device, vocab = self.model.device, self.model.config.vocab_size
                        r.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                        r.seen[torch.tensor(r.prompt, device=device)] = True
                        r.counts = torch.zeros(vocab, device=device)
                    self.active.append(r)
        self._drop_finished()
        if not self.active:
            return bool(self.waiting)
        computing(self.model.device)
        start = time.perf_counter()
        try:
            self._generate()
        except BaseException:
            self.release_weights()
            raise
        self.timings.steps += 1
        self.timings.step_seconds += time.perf_counter() - start
        self._drop_finished()
        if not self.active:
            self.cache = None  # idle: the next sequence starts on an empty cache, as the first one did
            self.release_weights()
        return bool(self.active or self.waiting)

    def _generate(self) -> None:
        """One token for every active sequence, after reading the new ones' prompts."""
        self.hold_weights()
        with torch.no_grad(), autocast(self.model.device, self.dtype):
            was_training = self.model.training
            if was_training:  # (switching walks every module: a few milliseconds a step for a 30-layer model)
                self.model.eval()
            try:
                if self.cache is None and hasattr(self.model, "new_cache"):
                    self.cache = self.model.new_cache(self.max_batch, min(self.first_columns, self.block), self.dtype)
                    self.rows = 0  # rows of the cache in use
                if self.cache is not None:
                    self._prefill_new()
                    self._drop_finished()
                    if self.active:
                        self._speculate() if self._speculating() else self._decode()
                else:
                    for r in self.active:
                        x = torch.tensor([r.context[-self.block:]], device=self.model.device)
                        self._sample([r], self.model(x)[:, -1])
            finally:
                if was_training:
                    self.model.train()

    def hold_weights(self) -> None:
        """The model's (and the draft's) weights as the steps multiply them, until :meth:`release_weights`."""
        if self.held is None:
            self.held = contextlib.ExitStack()
            for model, dtype in ((self.model, self.dtype), (self.draft, self.draft_dtype)):
                if model is not None:
                    self.held.enter_context(decoding_weights(model, dtype))

    def release_weights(self) -> None:
        """The model's own weights back: when no sequence is left, and before other work on the model (``call``)."""
        if self.held is not None:
            held, self.held = self.held, None
            held.close()

    def start(self) -> Scheduler:
        """Run steps in a thread of its own until ``close``; requests are then read from other threads."""
        self.closing = False
        self.thread = threading.Thread(target=drive, args=([self],), name="fournil-scheduler", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.release_weights()

    def safe_step(self) -> bool:
        """Pending calls, then a step; a step's fault ends its sequences (logged), not the engine."""
        if self.calls:
            self.release_weights()  # (scores are computed in their own precision, from the model's own weights)
        while self.calls:
            fn, args, future = self.calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except Exception as e:  # noqa: BLE001 - the caller's to handle
                    future.set_exception(e)
        try:
            return self.step()
        except Exception:  # noqa: BLE001 - a step's fault ends its sequences, not the engine
            log.exception("a generation step failed: its %d sequences end with an error", len(self.active))
            for r in self.active:
                r.finish_reason = "error"
                r.pieces.put(None)
            self.active, self.cache = [], None
            return bool(self.waiting)
        finally:
            if self.after_step:
                self.after_step()

    # ---- rows of the cache
    def _drop_finished(self) -> None:
        i = 0
        while i < len(self.active):
            r = self.active[i]
            if not r.done:
                i += 1
                continue
            if r.finish_reason is None:  # cancelled: its reader may be gone, but end its iterator anyway
                r.pieces.put(None)
            if self.cache is not None and i < self.rows:  # the last row in the cache takes its place
                if self.keep and r.cached == len(r.context) - 1 and self.cache.window is None:
                    self.kept = r.context[:r.cached], self.cache.keys_values(i, r.cached)
                last = self.rows - 1
                if i != last:
                    self.cache.move(last, i)
                    self.active[i], self.active[last] = self.active[last], r
                self.rows -= 1
                del self.active[last]
            else:
                del self.active[i]

    def _prefill_new(self) -> None:
        """Read the new requests' prompts (all but each one's last token) into the next free rows, each first taking
        the longest prefix it shares with a row already in the cache: in one pass, or two when some share a prefix
        with another new one, read first (batch-invariant: a pass each, from nothing)."""
        new = self.active[self.rows:]
        if self.batch_invariant:
            for r in new:
                self._read_into(self.rows, [r.context[:-1]])
                self.rows += 1
            return
        first, after = [], []
        heads = {}  # the first pass's rows by their first WORTH_A_PASS tokens: the only ones worth waiting for (a scan
        for r in new:  # of every one of them for each new row made 20,000 samples of names take 2 minutes, not 10 s)
            head = tuple(r.context[:WORTH_A_PASS]) if len(r.context) > WORTH_A_PASS else None
            ahead = max((common_prefix(r.context[:-1], f.context[:-1]) for f in heads.get(head, ())), default=0)
            worth = self.cache.window is None and ahead >= self._longest_shared(r)[1] + WORTH_A_PASS
            if worth:
                after.append(r)
            else:
                first.append(r)
                if head:
                    heads.setdefault(head, []).append(r)
        self.active[self.rows:] = first + after
        for group in (first, after):
            if group:
                shared = [self._longest_shared(r) for r in group]
                for r, (_, n) in zip(group, shared):
                    r.shared = n
                self._read_into(self.rows, [r.context[:-1] for r in group], shared)
                self.rows += len(group)

    def _longest_shared(self, new: Request) -> tuple[int, int]:
        """The row in the cache (or KEPT, the kept sequence) whose tokens begin with the longest prefix of ``new``'s
        prompt (a system prompt, the earlier turns of a conversation), and that prefix's length. None with a sliding
        window, whose mask counts columns: a copied prefix may stand further from what follows it than its tokens
        are."""
        row, longest = 0, 0
        if self.cache.window is not None:
            return row, longest
        for i, r in enumerate(self.active[:self.rows]):
            if r.cached == len(r.context) - 1:  # (not a row that went on from the last half of its context)
                n = common_prefix(new.context[:-1], r.context[:r.cached])
                row, longest = (i, n) if n > longest else (row, longest)
        if self.kept is not None:
            n = common_prefix(new.context[:-1], self.kept[0])
            row, longest = (KEPT, n) if n > longest else (row, longest)
        return row, longest

    def _read_into(self, first: int, reads: list[list[int]], shared: list[tuple[int, int]] | None = None) -> None:
        """Put each of ``reads`` in a row from ``first`` on, in one pass, each ending at the cache's current column
        (the shorter ones padded on the left; the rows in use first moved to end later if one needs more room);
        batch-invariant, a single row from column 0. ``shared``, for each read: a row in the cache and how many of the
        read's first tokens it holds, copied instead of read (they go before the pass's columns)."""
        cache = self.cache
        shared = shared or [(0, 0)] * len(reads)
        for row, tokens in enumerate(reads, first):
            cache.valid[row] = False
            self.active[row].cached = len(tokens)
        longest = max(len(t) - n for t, (_, n) in zip(reads, shared))
        before = max(n for _, n in shared)
        if self.batch_invariant:
            self._columns(longest)
            start = 0
        else:
            if longest + before > cache.length:
                cache.align(self._columns(longest + before), self.rows)
            start = cache.length - longest
            for row, (source, n) in zip(range(first, first + len(reads)), shared):
                if n:
                    kv = [t[:, :n] for t in self.kept[1]] if source == KEPT else cache.keys_values(source, n)
                    cache.put(kv, row, start)
        if not longest:
            return
        reads = [t[n:] for t, (_, n) in zip(reads, shared)]
        ids = torch.tensor([[0] * (longest - len(t)) + t for t in reads], device=self.model.device)
        valid = torch.tensor([[False] * (longest - len(t)) + [True] * len(t) for t in reads], device=ids.device)
        self.model(ids, cache.rows(first, first + len(reads), start), valid=valid, logits_to_keep=0)
        cache.length = max(cache.length, start + longest)

    def _columns(self, end: int) -> int:
        """A column count of at least ``end``, growing the cache (by a quarter) if it is narrower."""
        size = self.cache.size
        if end > size:
            grown = min(self.block, max(end, size + max(size // 4, 32)))
            self.cache.resize(self.cache.valid.shape[0], grown, self.rows)
        return end

    def _decode(self) -> None:
        """Feed every active sequence's last token in one pass and choose the next (batch-invariant: a pass each)."""
        cache = self.cache
        for i, r in enumerate(self.active):
            if r.cached == self.block:  # its context is full: go on from the last half
                self._read_into(i, [r.context[-half_context(self.block):-1]])
        if self.batch_invariant:
            for i, r in enumerate(self.active):
                self._columns(r.cached + 1)
                logits = self.model(torch.tensor([[r.context[-1]]], device=self.model.device), cache.rows(i, i + 1, r.cached))
                r.cached += 1
                cache.length = max(cache.length, r.cached)
                self._sample([r], logits[:, -1])
            return
        if cache.length == cache.size:  # no free column: widen the cache, or reclaim the columns of padding
            longest = max(r.cached for r in self.active)
            if cache.size < self.block and longest > cache.size * 3 // 4:
                self._columns(cache.size + 1)
            else:
                cache.align(longest, self.rows)
        tokens = torch.tensor([[r.context[-1]] for r in self.active], device=self.model.device)
        use_compiled_step(self.model)
        step = decoding_step(self.model)
        if step is not None:
            logits, norms = step(tokens, Fixed(cache, self.rows))
        else:
            logits, norms = self.model(tokens, cache.rows(0, self.rows))[:, -1], None
        cache.length += 1
        for r in self.active:
            r.cached += 1
        self._sample(self.active, logits, norms)

    def _speculating(self) -> bool:
        """Whether this step decodes speculatively: a draft, one sequence, no penalties, room for its proposals."""
        if self.draft is None or len(self.active) != 1 or self.batch_invariant:
            return False
        r = self.active[0]
        room = min(self.block, self.draft.config.block_size)
        return not r.params.adjusted and len(r.context) + self.draft_tokens + 1 < room and \
            self.cache.length + self.draft_tokens + 1 <= self.block

    def _speculate(self) -> None:
        """The lone sequence's next tokens: the draft proposes, the model checks them all in one pass (its cache then
        forgets the refused ones, and so does the draft's)."""
        r, cache, device = self.active[0], self.cache, self.model.device
        if r.draft_cache is None:
            size = min(self.draft.config.block_size, len(r.context) + r.params.max_new_tokens + self.draft_tokens + 1)
            r.draft_cache, r.draft_read = self.draft.new_cache(1, size, self.draft_dtype), 0

        def feed(tokens: list[int]) -> torch.Tensor:
            r.draft_read += len(tokens)
            with torch.autocast(device.type, dtype=self.draft_dtype, enabled=self.draft_dtype != torch.float32):
                return self.draft(torch.tensor([tokens], device=device), r.draft_cache)[0, -1].float()

        ahead = min(self.draft_tokens, r.params.max_new_tokens - r.generated - 1)
        proposed, q = propose(feed(r.context[r.draft_read:]), lambda token: feed([token]), r.params, r.generator,
                              ahead) if ahead > 0 else ([], [])
        start = cache.length
        self._columns(start + len(proposed) + 1)
        logits = self.model(torch.tensor([[r.context[-1], *proposed]], device=device), cache.rows(0, 1))[0].float()
        kept = verify(proposed, q, logits, r.params, r.generator)
        cache.length = start + len(kept)  # the last kept token is not read yet
        r.cached += len(kept)
        self.speculation.passes += 1
        for token, row, norm in zip(kept, logits, log_normalizers(logits)):
            self._accept(r, token, row, norm)
            self.speculation.tokens += 1
            if r.done:
                break
        r.draft_read = r.draft_cache.length = min(r.draft_read, len(r.context) - 1)

    # ---- sampling
    def _sample(self, requests: list[Request], logits: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """The next token of each request, from its row of ``logits`` (the rows' most likely tokens for the greedy
        requests without penalties in one call for all rows). ``norms``: each row's log of the sum of its exponentiated
        scores (a log-probability is a score minus it), when the compiled step computed them beside the scores."""
        logits = logits.float()
        norms = log_normalizers(logits) if norms is None else norms.tolist()
        plain = [r.params.temperature < GREEDY_BELOW and not r.params.adjusted for r in requests]
        most_likely = most_likely_tokens(logits) if any(plain) else plain  # (no argmax when every row samples)
        for r, row, norm, greedy, best in zip(requests, logits, norms, plain, most_likely):
            p = r.params
            if not greedy:
                scores = penalize(row[None], r.seen[None], r.counts[None], p) if p.adjusted else row[None]
                best = int(choose(scores, p, r.generator)[0])
            self._accept(r, best, row, norm)

    def _accept(self, r: Request, token: int, scores: torch.Tensor, norm: float) -> None:
        """``token`` joins the sequence (``scores``: the model's, fp32, ``norm`` their log-sum-exp): its piece of text
        goes out, and the sequence ends if it should."""
        p = r.params
        if r.seen is not None:
            r.seen[token] = True
            r.counts[token] += 1
        r.generated += 1
        if r.generated == 1:
            self.timings.first_tokens += 1
            self.timings.first_token_seconds += time.perf_counter() - r.arrived
        r.context.append(token)
        text = r.text.feed(token)
        if r.text.at_stop_token:
            self._finish(r, "stop", text)
            return
        top = None
        if p.logprobs:
            values, ids = scores.topk(min(p.logprobs, scores.shape[-1]))
            top = dict(zip(ids.tolist(), (values - norm).tolist()))
        r.pieces.put(Piece(text, token, float(scores[token]) - norm, top))
        if r.text.done:
            self._finish(r, "stop")
        elif r.generated == p.max_new_tokens:
            self._finish(r, "length", r.text.finish())

    @staticmethod
    def _finish(r: Request, reason: str, rest: str = "") -> None:
        if rest:
            r.pieces.put(Piece(rest, -1, 0.0))
        r.finish_reason = reason
        r.pieces.put(None)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens ``a`` and ``b`` have in common (by halving: a few comparisons of slices, at C speed)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if a[:middle] == b[:middle] else (low, middle - 1)
    return low


def drive(schedulers: list[Scheduler], running=lambda: True) -> None:
    """Steps of every scheduler in turn, in the calling thread, until one is closed or ``running()`` is false (checked
    at least every half second); idle, it sleeps until a request or a call arrives. The schedulers share one
    ``wake`` condition."""
    wake = schedulers[0].wake
    while running() and not any(s.closing for s in schedulers):
        busy = False
        for s in schedulers:
            busy |= s.safe_step()
        if not busy:
            for s in schedulers:  # (a step compiled in the background loads before the next request, not during it)
                use_compiled_step(s.model)
            with wake:
                wake.wait_for(lambda: any(s.pending for s in schedulers), timeout=0.5)
