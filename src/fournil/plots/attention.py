"""Attention as pictures: heat maps of which tokens each token reads, per head and averaged, and one token's row."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fournil.plots.canvas import pyplot


def visible(text: str) -> str:
    """A token as tables and pictures show it: a space as ``␣``, a line end as ``↵``, another control character
    escaped (``\\x7f``: fonts have no glyph for it), nothing as ``∅``."""
    text = text.replace(" ", "\u2423").replace("\n", "\u21b5")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) or "\u2205"


def token_labels(tokens: list[str]) -> list[str]:
    return [visible(t) for t in tokens]


def plot_attention(tokens: list[str], weights: torch.Tensor, path: Path, layer: int, head: int | None = None,
                   focus: int | None = None, title: str = "", columns: list[str] | None = None) -> None:
    """``weights`` is one layer's (heads, rows, columns): the ``tokens`` of a text reading themselves (causal
    self-attention), or, given ``columns`` (a source's tokens), the tokens written reading them (cross-attention).
    One head's map, or every head's and their average; with ``focus`` (a row's index), that row as bars: how much
    that token reads each token."""
    with pyplot() as plt:
        maps = [(f"layer {layer}, head {head}", weights[head])] if head is not None else \
            [(f"head {h}", w) for h, w in enumerate(weights)] + [(f"layer {layer}, average of heads", weights.mean(0))]
        cols = min(4, len(maps))
        rows = math.ceil(len(maps) / cols) + (focus is not None)
        labels = token_labels(tokens)
        read = labels if columns is None else token_labels(columns)
        fig = plt.figure(figsize=(3.6 * cols, 3.4 * rows), dpi=100)
        for i, (name, w) in enumerate(maps):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(w.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto" if columns else "equal")
            ax.set_title(name, fontsize=9)
            if max(len(labels), len(read)) <= 40:
                ax.set_xticks(range(len(read)), read, rotation=90, fontsize=6)
                ax.set_yticks(range(len(labels)), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if columns is not None and i == 0:
                ax.set_xlabel("source", fontsize=7)
                ax.set_ylabel("written", fontsize=7)
        if focus is not None:
            seen = len(read) if columns is not None else focus + 1  # (a text's token reads only those before it)
            row = maps[-1][1][focus][:seen]
            ax = fig.add_subplot(rows, 1, rows)
            ax.bar(range(seen), row.numpy(), color="tab:blue")
            ax.set_xticks(range(seen), read[:seen], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("attention")
            ax.set_title(f"what {labels[focus]!r} reads ({maps[-1][0]})", fontsize=10)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
