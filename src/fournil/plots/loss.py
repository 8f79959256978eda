"""The training and validation loss curves of a run, as ``loss.png``."""
from __future__ import annotations

from pathlib import Path

from fournil.plots.canvas import pyplot


def plot_loss(metrics: list[dict], path: Path, title: str) -> None:
    with pyplot() as plt:
        train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
        val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
