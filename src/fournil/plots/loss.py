"""The training and validation loss curves of a run, as ``loss.png``."""
from __future__ import annotations

from pathlib import Path

from fournil.plots.canvas import pyplot


def plot_loss(metrics: list[dict], path: Path, title: str, train_key: str = "train_loss", val_key: str = "val_loss",
              measure: str = "loss (nats per token)") -> None:
    """The figure ``train_key`` of each logged step and ``val_key`` of each validation, which measure ``measure``."""
    with pyplot() as plt:
        train = [(m["step"], m[train_key]) for m in metrics if train_key in m]
        val = [(m["step"], m[val_key]) for m in metrics if val_key in m]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel(measure)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
