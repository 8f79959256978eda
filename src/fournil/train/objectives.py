"""Objectives: what a training step minimises, and how a validation set is scored.

``loss(model, batch) -> (loss, metrics)``: ``metrics`` holds ``tokens`` (for the speed shown) and any other figure
worth logging, as tensors averaged over the steps between two log lines. ``validate(model, data, dtype, max_tokens)``
returns ``{"loss": ...}`` (what the best checkpoint is chosen by) and the figures of the whole set. ``curves``: which
of the logged figures a run shows (:class:`Curves`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fournil.data.batches import IGNORE, LineData, pack, row_sums
from fournil.device import autocast
from fournil.evaluate import evaluate_nll
from fournil.evaluate.metrics import scoring_bar
from fournil.models.base import chunk_positions, packed_width, shares_prompts, target_logprobs


class Curves(NamedTuple):
    """What the progress line and ``loss.png`` show, train beside val in the same measure: the logged figures, what
    they measure, and the train figure's short name."""

    train: str = "train_loss"
    val: str = "val_loss"
    measure: str = "loss (nats per token)"
    name: str = "loss"


def packing(data, *models) -> dict:
    """How ``models`` read the batches of ``data`` (``pack_to`` and ``share`` for an objective): the rows of one
    document each that lines and instructions give (padded to the longest) packed into rows as wide as the models,
    if every one of them can keep the documents apart (:func:`pack`); running text's full rows as they are."""
    if not isinstance(data, LineData) or not all(m.packs for m in models):
        return {}
    return {"pack_to": min(packed_width(m) for m in models), "share": all(shares_prompts(m) for m in models)}


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor, **inputs) -> torch.Tensor:
    """The log-probability of each target (B, T), 0 where the target is ``IGNORE`` (prompt, padding)."""
    return model(x, targets=y, **inputs)


def pair_logprobs(logprobs, x: torch.Tensor, y: torch.Tensor, pack_to: int | None) -> torch.Tensor:
    """log p(answer | prompt) of each pair's chosen and rejected answers (pairs, 2), from ``logprobs(x, y)``, each
    target's log-probability; with ``pack_to``, pairs packed into rows of that width, each prompt read once for both
    answers and the system prompt once per row (:func:`pack`)."""
    x, y = x.flatten(0, 1), y.flatten(0, 1)
    if not pack_to:
        return logprobs(x, y).sum(-1).view(-1, 2)
    xs, sees, ys, owner = pack(x, y, pack_to, share=True, sizes=[2] * (len(x) // 2))
    return row_sums(logprobs(xs, ys, sees=sees), owner, len(x)).view(-1, 2)


def weight(objective, batch: tuple) -> int:
    """What ``batch`` weighs in the loss of a step it is part of: its target tokens for a loss averaged over tokens,
    its rows (pairs, answers) for one averaged over rows. The parts of a step read in several passes are weighted by
    it, so that the step's gradient is that of the whole batch."""
    return len(batch[0]) if getattr(objective, "averages_rows", False) else int((batch[-1] != IGNORE).sum())


@contextlib.contextmanager
def evaluating(model):
    """No dropout and no gradients, then back to how the model was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def mean_over_batches(objective, model, data, dtype, max_tokens, rows_known: bool = True) -> dict:
    """An objective's loss and metrics averaged over a set, weighted by the rows of each batch; ``rows_known``: all
    ``len(data)`` rows are read when ``max_tokens`` is None."""
    totals, rows = {}, 0
    with evaluating(model), scoring_bar(len(data) if rows_known and not max_tokens else None, data.split, "row") as bar:
        for batch in data.batches(16, max_tokens):
            batch = tuple(b.to(model.device) for b in batch)
            with autocast(model.device, dtype):
                loss, metrics = objective.loss(model, batch)
            n = len(batch[0])
            for k, v in {"loss": loss, **metrics}.items():
                if k != "tokens":
                    totals[k] = totals.get(k, 0.0) + float(v) * n
            rows += n
            bar.update(n)
    return {k: v / rows for k, v in totals.items()}


class NextTokenPrediction:
    """Pretraining and fine-tuning: the average negative log-likelihood of each next token (padding and prompts
    excluded). A batch is the model's inputs then the targets: ``(x, y)``, or ``(source, target input, y)`` for a
    sequence-to-sequence model, whose objective is the same, conditioned on the source. With ``pack_to``, rows of one
    document each are first packed into fewer rows of that many tokens (:func:`pack`): the same loss, from fewer
    positions; with ``share`` too, what all the rows hold before their first target (a system prompt) read once per
    row."""

    curves = Curves()

    def __init__(self, pack_to: int | None = None, share: bool = False):
        self.pack_to, self.share = pack_to, share

    def loss(self, model, batch):
        *inputs, y = batch
        tokens = int((y != IGNORE).sum())
        packed = {}
        if self.pack_to:
            x, packed["sees"], y, _ = pack(*inputs, y, self.pack_to, self.share)
            inputs = [x]
        return -model(*inputs, targets=y, **packed).sum() / tokens, {"tokens": tokens}

    def validate(self, model, data, tokenizer, dtype, max_tokens) -> dict:
        return {"loss": evaluate_nll(model, data, tokenizer, dtype, max_tokens=max_tokens)["nll"]}


class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023): raise the chosen answer's log-probability relative to
    the reference model more than the rejected one's, ``-log sigmoid(beta * (chosen - rejected))`` of those
    log-ratios. ``beta * log-ratio`` is the answer's implicit reward; reward accuracy is the share of pairs whose
    chosen answer gets the higher one.

    ``reference(x, y)`` gives the reference model's log-probability of each target, unless batches carry the
    answers' (computed once beforehand); ``pack_to``: the pairs are packed (:func:`pair_logprobs`)."""

    rows_per_example = 2  # a batch of pairs: a chosen and a rejected answer each
    averages_rows = True
    curves = Curves(measure="DPO loss (nats per pair)")

    def __init__(self, beta: float, reference=None, pack_to: int | None = None):
        self.beta, self.reference, self.pack_to = beta, reference, pack_to

    def loss(self, model, batch):
        x, y = batch[0], batch[1]
        policy = pair_logprobs(functools.partial(token_logprobs, model), x, y, self.pack_to)
        ref = batch[2] if len(batch) > 2 else pair_logprobs(self.reference, x, y, self.pack_to)
        rewards = self.beta * (policy - ref.float())
        margin = rewards[:, 0] - rewards[:, 1]
        loss = -F.logsigmoid(margin).mean()
        return loss, {"tokens": int((y != IGNORE).sum()), "reward_accuracy": (margin > 0).float().mean().detach(),
                      "margin": margin.mean().detach(), "chosen_reward": rewards[:, 0].mean().detach(),
                      "rejected_reward": rewards[:, 1].mean().detach()}

    def validate(self, model, data, tokenizer, dtype, max_tokens) -> dict:
        if data.ref is None and self.reference is not None:  # the frozen reference scores held-out pairs alike each time
            data.ref = reference_scores(self.reference, data, model.device, dtype, max_tokens, self.pack_to)
        return mean_over_batches(self, model, data, dtype, max_tokens)


@torch.no_grad()
def reference_scores(logprobs, data, device, dtype, max_tokens: int | None = None,
                     pack_to: int | None = None) -> torch.Tensor:
    """The reference's log-probability of each answer of the pairs that ``data.batches`` gives (the first ones only,
    under ``max_tokens``): a row per pair, chosen then rejected, for the batches to carry."""
    rows = []
    with scoring_bar(None if max_tokens else len(data), f"{data.split} (reference)", "pair") as bar:
        for x, y in data.batches(16, max_tokens):
            with autocast(device, dtype):
                rows.append(pair_logprobs(logprobs, x.to(device), y.to(device), pack_to).cpu())
            bar.update(len(x))
    return torch.cat(rows)


class PairwiseReward:
    """A reward model's objective (Bradley-Terry): ``-log sigmoid(r(chosen) - r(rejected))``, so that
    ``sigmoid(r(a) - r(b))`` is the probability that people prefer ``a``."""

    rows_per_example = 2
    averages_rows = True
    curves = Curves(measure="Bradley-Terry loss (nats per pair)")

    def loss(self, model, batch):
        x, y = batch[0], batch[1]
        rewards = model(x, y).float()
        margin = rewards[:, 0] - rewards[:, 1]
        loss = -F.logsigmoid(margin).mean()
        return loss, {"tokens": int((y != IGNORE).sum()), "accuracy": (margin > 0).float().mean().detach(),
                      "margin": margin.mean().detach()}

    def validate(self, model, data, tokenizer, dtype, max_tokens) -> dict:
        return mean_over_batches(self, model, data, dtype, max_tokens)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool = False) -> torch.Tensor:
    """The KL divergence between the teacher's and the student's distributions (logits, one row per position), both
    softened by ``temperature``, averaged over positions and scaled by the temperature's square (which keeps its
    gradients the size of the next-token loss's, Hinton et al. 2015). Forward, KL(teacher || student), covers all
    the teacher's likely tokens; reverse, KL(student || teacher), settles on its main ones."""
    return SoftenedKL.apply(student, teacher, temperature, reverse)


class SoftenedKL(torch.autograd.Function):
    """:func:`distillation_loss`, computed a chunk of positions at a time (as many as ``LOGITS_BUDGET`` holds) in
    three fp32 buffers made once, its gradient written out rather than traced: with p = softmax(logits / T), forward
    KL's is T (p_student - p_teacher) per position, reverse KL's T p_student (log p_student - log p_teacher - KL).
    Traced through autograd, each chunk made a dozen (positions, vocab) tensors, each new memory the system had to
    clear: 8 rows of 256 tokens of SmolLM2's 49,152-token vocabulary took 2.9 s a step, and 2.4 million page faults."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, reverse: bool):
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.reverse = temperature, reverse
        total = student.new_zeros((), dtype=torch.float32)
        for s, t, (a, b, scratch) in SoftenedKL.chunks(student, teacher):
            log_softened(s, temperature, a, scratch)
            log_softened(t, temperature, b, scratch)
            if reverse:  # sum p_s (log p_s - log p_t)
                b.sub_(a).neg_()
                a.exp_()
            else:  # sum p_t (log p_t - log p_s)
                a.sub_(b).neg_()
                b.exp_()
            total += torch.dot(a.view(-1), b.view(-1))
        return total / max(len(student), 1) * temperature**2

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        temperature = ctx.temperature
        out = torch.empty_like(student)
        scale = grad.float() * temperature / max(len(student), 1)  # d(T^2 KL / N) / d logits = T / N x dKL / d(z / T)
        at = 0
        for s, t, (a, b, scratch) in SoftenedKL.chunks(student, teacher):
            log_softened(s, temperature, a, scratch)
            log_softened(t, temperature, b, scratch)
            if ctx.reverse:  # p_s (log p_s - log p_t - KL of the row)
                b.sub_(a).neg_()
                a.exp_()
                b.sub_((a.unsqueeze(1) @ b.unsqueeze(2)).view(-1, 1)).mul_(a)  # (rows' KL: no temporary of a's size)
                gradient = b
            else:  # p_s - p_t
                a.exp_().sub_(b.exp_())
                gradient = a
            out[at : at + len(s)] = gradient.mul_(scale)
            at += len(s)
        return out, None, None, None

    @staticmethod
    def chunks(student: torch.Tensor, teacher: torch.Tensor):
        """(student rows, teacher rows, three fp32 buffers of their shape) for each chunk of positions."""
        size = chunk_positions(student.shape[-1])
        buffers = [student.new_empty((min(size, len(student)), student.shape[-1]), dtype=torch.float32)
                   for _ in range(3)]
        for i in range(0, len(student), size):
            s, t = student[i : i + size], teacher[i : i + size]
            yield s, t, [b[: len(s)] for b in buffers]


def log_softened(logits: torch.Tensor, temperature: float, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """log softmax(logits / temperature) into ``out``, through ``scratch`` (both fp32, the logits' shape)."""
    torch.log_softmax(scratch.copy_(logits).div_(temperature), -1, out=out)


class Distillation:
    """A student imitating a teacher: ``alpha`` x the distillation loss + (1 - alpha) x the next-token loss, on the
    positions that carry a target. The teacher only reads (no gradients, inference mode, the run's precision). Both
    models' logits at those positions are held, but none of their softmaxes whole. ``pack_to`` and ``share``: both
    read the batch packed, as :class:`NextTokenPrediction` does."""

    curves = Curves("train_nll", measure="the student's NLL (nats per token)", name="nll")  # (not the mixed objective)

    def __init__(self, teacher, temperature: float, alpha: float, reverse: bool = False, pack_to: int | None = None,
                 share: bool = False):
        self.teacher, self.temperature, self.alpha, self.reverse = teacher, temperature, alpha, reverse
        self.pack_to, self.share = pack_to, share
        teacher.eval().requires_grad_(False)

    def loss(self, model, batch):
        x, y = batch
        packed = {}
        if self.pack_to:
            x, packed["sees"], y, _ = pack(x, y, self.pack_to, self.share)
        keep = y != IGNORE
        logits = model(x, **packed)[keep]
        nll = -target_logprobs(nn.Identity(), logits, y[keep]).mean()
        with torch.no_grad():
            taught = self.teacher(x, **packed)[keep]
        kd = distillation_loss(logits, taught, self.temperature, self.reverse)
        return self.alpha * kd + (1 - self.alpha) * nll, {"tokens": int(keep.sum()), "kd": kd.detach(), "nll": nll.detach()}

    def validate(self, model, data, tokenizer, dtype, max_tokens) -> dict:
        """The student's own NLL: what distillation is for."""
        return {"loss": evaluate_nll(model, data, tokenizer, dtype, max_tokens=max_tokens)["nll"]}
