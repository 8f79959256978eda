"""Group-relative policy optimization (GRPO, Shao et al. 2024), an RLHF-style loop without a value model.

For each prompt the policy samples a group of answers through the generation engine; each answer's advantage is its
reward minus the group's mean, over the group's standard deviation. The loss raises the log-probability of the
answers that beat their group and lowers the others', plus ``beta`` times a per-token estimate of the KL divergence
from the reference model (``exp(d) - d - 1`` with ``d = log ref - log policy``, always >= 0), which keeps the policy
from drifting into text the reward model was never trained on.
"""
from __future__ import annotations

import torch

from fournil.data.batches import IGNORE, pack, prompt_groups, row_sums
from fournil.data.instructions import pad_id
from fournil.generate import SamplingParams, complete
from fournil.train.objectives import Curves, evaluating, mean_over_batches, token_logprobs

VAL_PROMPTS = 16  # held-out prompts answered at each validation (generation is the slow part)


class Rollouts:
    """GRPO's data, made as training goes: answers the policy samples, scored. A batch is ``(x, y, advantage, reward)``:
    prompt and answer tokens, the answer's targets (``IGNORE`` elsewhere), one advantage and one reward per answer."""

    def __init__(self, prompts, model, tokenizer, reward, align, dtype: torch.dtype):
        self.prompts, self.model, self.tokenizer, self.reward = prompts, model, tokenizer, reward
        self.split = prompts.split
        self.group, self.dtype = align.group, dtype
        self.params = dict(max_new_tokens=align.max_new_tokens, temperature=align.temperature)

    def __len__(self) -> int:
        return len(self.prompts)

    def rollout(self, picks: list[int], group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``group`` answers to each prompt picked: (x, y, rewards)."""
        ids = [self.prompts.ids[i] for i in picks for _ in range(group)]
        with evaluating(self.model):
            done = complete(self.model, self.tokenizer, ids, SamplingParams(**self.params, seed=seed), self.dtype)
        answers = [c.tokens + ([c.stop_token] if c.stop_token is not None else []) for c in done]
        asked = [i for i in picks for _ in range(group)]
        rewards = self.reward([self.prompts.conversations[i] for i in asked], [c.text for c in done],
                              [self.prompts.references[i] for i in asked])
        width = max(len(p) + len(a) for p, a in zip(ids, answers)) - 1
        x = torch.full((len(ids), width), pad_id(self.tokenizer), dtype=torch.long)
        y = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        for row, (p, a) in enumerate(zip(ids, answers)):
            x[row, : len(p) + len(a) - 1] = torch.tensor(p + a[:-1])
            y[row, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(a)
        return x, y, torch.tensor(rewards, dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator) -> tuple:
        picks = torch.randint(len(self), (n // self.group,), generator=generator).tolist()
        seed = int(torch.randint(2**31, (1,), generator=generator))
        x, y, rewards = self.rollout(picks, self.group, seed)
        r = rewards.view(-1, self.group)
        advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
        return x, y, advantages.flatten(), rewards

    def batches(self, batch_size: int, max_tokens: int | None = None):
        """One answer to each of the first held-out prompts (as many as ``max_tokens`` of answers allow, at most
        ``VAL_PROMPTS``), drawn with the same seed at every validation."""
        count = min(len(self), VAL_PROMPTS, max(1, max_tokens // self.params["max_new_tokens"]) if max_tokens else VAL_PROMPTS)
        for lo in range(0, count, batch_size):
            x, y, rewards = self.rollout(list(range(lo, min(lo + batch_size, count))), 1, seed=lo)
            yield x, y, torch.zeros_like(rewards), rewards


class GRPO:
    """The loss of a batch of rollouts; ``reference(x, y)`` gives the reference model's per-token log-probabilities.
    With ``pack_to``, the rollouts are packed into rows of that width, the answers to one prompt after it, read once,
    and the system prompt once per row (:func:`pack`): under the policy and the reference alike."""

    averages_rows = True  # each answer's mean over its tokens, averaged over answers
    curves = Curves("train_reward", "val_reward", "mean reward of the answers", "reward")

    def __init__(self, beta: float, reference, pack_to: int | None = None):
        self.beta, self.reference, self.pack_to = beta, reference, pack_to

    def loss(self, model, batch):
        x, y, advantages, rewards = batch
        rows, inputs = len(x), {}
        owner = torch.arange(rows, device=x.device)[:, None].expand_as(x)  # each position's answer
        if self.pack_to:
            x, sees, y, owner = pack(x, y, self.pack_to, share=True, sizes=prompt_groups(x, y))
            inputs = {"sees": sees}
        mask = y != IGNORE
        logp = token_logprobs(model, x, y, **inputs)
        d = self.reference(x, y, **inputs) - logp
        kl = d.exp() - d - 1
        # one update per sample, so the policy ratio of PPO-style methods is 1 and its gradient is that of log p
        tokens = row_sums(mask.float(), owner, rows).clamp(min=1)
        logp, kl = row_sums(logp * mask, owner, rows) / tokens, row_sums(kl * mask, owner, rows) / tokens
        loss = (-advantages * logp + self.beta * kl).mean()
        return loss, {"tokens": int(mask.sum()), "reward": rewards.mean(), "kl": kl.mean().detach()}

    def validate(self, model, data, tokenizer, dtype, max_tokens) -> dict:
        """The mean reward of held-out answers (its negative is the loss the best checkpoint is chosen by) and the
        policy's KL divergence from the reference per token."""
        scores = mean_over_batches(self, model, data, dtype, max_tokens, rows_known=False)  # (VAL_PROMPTS at most)
        return {"loss": -scores["reward"], "reward": scores["reward"], "kl": scores["kl"]}
