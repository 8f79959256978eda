"""Token embeddings seen from above: their two principal components as a labelled scatter plot."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fournil.errors import FournilError
from fournil.plots.attention import token_labels
from fournil.plots.canvas import pyplot


def token_embeddings(model) -> torch.Tensor:
    """The model's input embedding matrix (vocabulary x width); a seq2seq model's decoder's (``shared``: the
    encoder's too, unless it has its own)."""
    found = next((m.weight for name, m in model.named_modules() if isinstance(m, nn.Embedding)
                  and name.rsplit(".", 1)[-1] in ("wte", "embed_tokens", "shared")), None)
    if found is None:
        raise FournilError(f"the {model.family} model has no token embeddings: use an mlp, rnn, gpt, llama or seq2seq "
                           f"model")
    return found.detach()[: model.config.vocab_size].float().cpu()  # (the MLP adds a start symbol)


def principal_components(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``x`` projected on its ``k`` first principal components, and the share of variance each explains."""
    centered = x - x.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[:k].T, (s[:k] ** 2) / (s**2).sum()


def plot_embeddings(points: torch.Tensor, labels: list[str], shares: torch.Tensor, path: Path, title: str) -> None:
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
        ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=12, color="tab:blue", alpha=0.5)
        for (x, y), label in zip(points.tolist(), token_labels(labels)):
            ax.annotate(label, (x, y), fontsize=8, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(f"first principal component ({100 * shares[0]:.1f} % of the variance)")
        ax.set_ylabel(f"second principal component ({100 * shares[1]:.1f} %)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
