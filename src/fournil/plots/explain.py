"""Token probabilities as pictures: a bar per token, coloured from surprising (red) to expected (green), in a PNG and in
the terminal."""
from __future__ import annotations

from pathlib import Path

from fournil.plots.canvas import pyplot

SCALE = [(0.01, 196), (0.1, 208), (0.3, 220), (0.6, 148), (1.01, 40)]  # (probability below, xterm-256 background)


def band(prob: float) -> int:
    """Which step of the scale a probability falls on: 0 (below 0.01) to 4 (0.6 and above)."""
    return next(n for n, (limit, _) in enumerate(SCALE) if prob < limit)


def terminal_colour(prob: float) -> str:
    """The ANSI escape that paints a token's background by its probability."""
    return f"\x1b[30;48;5;{SCALE[band(prob)][1]}m"


def coloured_text(result: dict) -> str:
    """The text as the model read it, each token on the colour of its probability."""
    return result["context"] + "".join(f"{terminal_colour(r['prob'])}{r['token']}\x1b[0m" for r in result["rows"])


def legend() -> str:
    bounds = [0.0] + [limit for limit, _ in SCALE[:-1]] + [1.0]
    return "  ".join(f"{terminal_colour(lo)} {lo:g}-{hi:g} \x1b[0m" for lo, hi in zip(bounds, bounds[1:]))


def figure_size(n: int) -> tuple[float, float]:
    """Inches: wide enough for each token's label, within reason."""
    return min(24.0, max(6.0, 0.5 * n + 1.5)), 4.5


def plot_token_probs(result: dict, path: Path, title: str) -> None:
    """Bars of each token's probability; above a token the model did not rank first, the one it expected."""
    with pyplot() as plt:
        rows = result["rows"]
        cmap = plt.get_cmap("RdYlGn")
        fig, ax = plt.subplots(figsize=figure_size(len(rows)), dpi=100)
        probs = [r["prob"] for r in rows]
        colours = [cmap(0.05 + 0.9 * band(p) / (len(SCALE) - 1)) for p in probs]  # the terminal's scale
        ax.bar(range(len(rows)), probs, color=colours, edgecolor="grey", linewidth=0.5)
        for x, r in enumerate(rows):
            if r["rank"] > 1 and len(rows) <= 60:
                best, p = r["top"][0]
                ax.annotate(f"{best} {p:.2f}", (x, r["prob"]), xytext=(0, 3), textcoords="offset points", ha="center",
                            rotation=90, fontsize=7, color="dimgrey")
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=90 if len(rows) > 12 else 0, fontsize=8)
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("probability given the tokens before")
        ax.set_title(f"{title}\nNLL {result['nll']:.3f} nats over {len(rows)} tokens, average {result['avg_nll']:.3f}"
                     " (grey: the token the model expected instead)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
