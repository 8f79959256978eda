"""The leaderboard: Bradley-Terry scores fitted by maximum likelihood on the votes, on the Elo scale as Chatbot Arena
publishes them, with 95 % intervals from a bootstrap over battles.

Bradley-Terry: model i beats model j with probability 1 / (1 + 10^((R_j - R_i) / 400)). A tie counts half a win to
each side; "both bad" says nothing about which is better, and is kept but not fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fournil.plots.canvas import pyplot

ELO_SCALE, ELO_MEAN = 400 / math.log(10), 1000.0  # natural log-odds -> Elo points; the average model's score
POINTS = {"a": 1.0, "b": 0.0, "tie": 0.5}  # what model A scores in a battle ("bad" is not fitted)
PRIOR = 1e-6  # a vanishing pull towards the average: a model that won (or lost) every battle still gets a finite score


@dataclass
class Standing:
    model: str
    score: float
    low: float  # 95 % interval
    high: float
    battles: int
    win_rate: float  # points per battle, a tie half a point


def outcomes(votes) -> list[tuple[str, str, float]]:
    """(model A, model B, A's points) of each vote that says which is better (or a tie)."""
    return [(v.battle.model_a, v.battle.model_b, POINTS[v.verdict]) for v in votes if v.verdict in POINTS]


def points_matrix(models: list[str], games: list[tuple[str, str, float]], weights=None) -> np.ndarray:
    """points[i, j]: what model i scored against model j over ``games`` (each counted ``weights`` times)."""
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[g[0]] for g in games], dtype=int)
    b = np.array([index[g[1]] for g in games], dtype=int)
    s = np.array([g[2] for g in games], dtype=float)
    w = np.ones(len(games)) if weights is None else weights
    points = np.zeros((len(models), len(models)))
    np.add.at(points, (a, b), w * s)
    np.add.at(points, (b, a), w * (1 - s))
    return points


def fit(points: np.ndarray) -> np.ndarray:
    """Elo-scale scores (averaging ``ELO_MEAN``) that maximize the Bradley-Terry likelihood of ``points``, by Newton's
    method on the log-odds strengths."""
    n = len(points)
    games = points + points.T
    beta = np.zeros(n)
    for _ in range(500):
        p = 1 / (1 + np.exp(beta[None, :] - beta[:, None]))  # p[i, j]: i beats j
        grad = points.sum(1) - (games * p).sum(1) - PRIOR * beta
        w = games * p * (1 - p)
        hessian = np.diag(w.sum(1) + PRIOR) - w
        step = np.linalg.lstsq(hessian, grad, rcond=None)[0]
        step *= min(1.0, 2.0 / max(np.abs(step).max(), 1e-300))  # at most 2 nats at a time (far from the optimum)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return ELO_MEAN + ELO_SCALE * (beta - beta.mean())


def leaderboard(votes, rounds: int = 1000, seed: int = 0) -> list[Standing]:
    """Each model's standing, best first; the interval from ``rounds`` refits on battles drawn with replacement."""
    games = outcomes(votes)
    models = sorted({m for g in games for m in g[:2]})
    if not games:
        return []
    points = points_matrix(models, games)
    scores = fit(points)
    rng = np.random.default_rng(seed)
    draws = np.array([fit(points_matrix(models, games, np.bincount(rng.integers(0, len(games), len(games)),
                                                                    minlength=len(games))))
                      for _ in range(rounds)])
    low, high = np.percentile(draws, [2.5, 97.5], axis=0) if rounds else (scores, scores)
    played = (points + points.T).sum(1)
    standings = [Standing(m, float(scores[i]), float(low[i]), float(high[i]), int(played[i]),
                          float(points[i].sum() / played[i])) for i, m in enumerate(models)]
    return sorted(standings, key=lambda s: -s.score)


def win_rates(votes, models: list[str]) -> np.ndarray:
    """rates[i, j]: the share of points model i took from model j (NaN where they never met)."""
    points = points_matrix(models, outcomes(votes))
    with np.errstate(invalid="ignore"):
        return points / (points + points.T)


def table(standings: list[Standing]) -> str:
    """The leaderboard as Markdown."""
    lines = ["| rank | model | score | 95 % interval | battles | win rate |", "| ---: | --- | ---: | --- | ---: | ---: |"]
    for rank, s in enumerate(standings, 1):
        lines.append(f"| {rank} | {s.model} | {s.score:.0f} | {s.low:.0f} to {s.high:.0f} | {s.battles:,} | "
                     f"{s.win_rate:.1%} |")
    return "\n".join(lines) + "\n"


def agreement(votes) -> tuple[float, int]:
    """How often a person and a judge gave the same verdict on the same battle, and on how many battles both voted."""
    verdicts: dict[str, dict[str, list[str]]] = {}
    for v in votes:
        verdicts.setdefault(v.battle.id, {"person": [], "judge": []})[v.voter_kind].append(v.verdict)
    pairs = [(p, j) for kinds in verdicts.values() for p in kinds["person"] for j in kinds["judge"]]
    both = sum(1 for kinds in verdicts.values() if kinds["person"] and kinds["judge"])
    return (sum(p == j for p, j in pairs) / len(pairs) if pairs else 0.0), both


def plot_win_rates(votes, standings: list[Standing], path, title: str = "share of points, row against column"):
    """The pairwise win-rate matrix as a PNG (``path``: a file name or a binary file), in leaderboard order."""
    with pyplot() as plt:
        models = [s.model for s in standings]
        rates = win_rates(votes, models)
        size = 2.5 + 0.9 * len(models)
        fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
        image = ax.imshow(np.ma.masked_invalid(rates), cmap="RdBu", vmin=0, vmax=1)
        for i in range(len(models)):
            for j in range(len(models)):
                if not math.isnan(rates[i, j]):
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_xlabel("against")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
