"""The training and validation loss curves of a run, as ``loss.png``; several runs' validation curves together."""
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


def plot_runs(curves: dict[str, list[tuple[float | None, float]]], path: Path, measure: str) -> None:
    """Each run's validation figures against its training time, in seconds (None: before training, as a tuned run's
    base is scored), on one picture; a run never timed (an n-gram, counted in one pass) is a dashed level across it,
    a baseline the others should go below."""
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for (name, points), colour in zip(curves.items(), colours * len(curves)):
            if all(time is None for time, _ in points):
                ax.axhline(points[-1][1], linestyle="--", label=name, color=colour)
            else:
                ax.plot([time or 0.0 for time, _ in points], [value for _, value in points], "o-", markersize=3,
                        label=name, color=colour)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(measure)
        ax.set_title("validation")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
