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


PER_LINE, LINES = 45, 20  # tokens a line of bars holds with labels that can be read, and the lines a picture holds


def figure_size(n: int) -> tuple[float, float]:
    """Inches: a line of bars as wide as its tokens' labels need, within reason, and a line for every PER_LINE tokens,
    as a page holds a long text."""
    lines = min(LINES, -(-n // PER_LINE))
    return min(24.0, max(6.0, 0.5 * min(n, PER_LINE) + 1.5)), 1.8 + 3.0 * lines


def plot_token_probs(result: dict, path: Path, title: str) -> None:
    """Bars of each token's probability, in lines of PER_LINE tokens; above a token the model did not rank first, the
    one it expected."""
    with pyplot() as plt:
        rows = result["rows"]
        shown = rows[:PER_LINE * LINES]
        lines = [shown[i:i + PER_LINE] for i in range(0, len(shown), PER_LINE)]
        cmap = plt.get_cmap("RdYlGn")
        fig, axes = plt.subplots(len(lines), 1, figsize=figure_size(len(rows)), dpi=100, squeeze=False,
                                 layout="constrained")  # (room for the title above a tall picture)
        for line, ax in zip(lines, axes[:, 0]):
            probs = [r["prob"] for r in line]
            colours = [cmap(0.05 + 0.9 * band(p) / (len(SCALE) - 1)) for p in probs]  # the terminal's scale
            ax.bar(range(len(line)), probs, color=colours, edgecolor="grey", linewidth=0.5)
            for x, r in enumerate(line):
                if r["rank"] > 1:
                    best, p = r["top"][0]
                    ax.annotate(f"{best} {p:.2f}", (x, r["prob"]), xytext=(0, 3), textcoords="offset points",
                                ha="center", rotation=90, fontsize=7, color="dimgrey")
            ax.set_xticks(range(len(line)), [r["label"] for r in line], rotation=90 if len(rows) > 12 else 0,
                          fontsize=8)
            ax.set_xlim(-0.6, (len(line) if len(lines) == 1 else PER_LINE) - 0.4)  # (a last short line: bars as wide)
            ax.set_ylim(0, 1.25)
        fig.supylabel("probability given the tokens before", fontsize=10)
        cut = f"\nthe first {len(shown):,} tokens (the table has them all)" if len(shown) < len(rows) else ""
        fig.suptitle(f"{title}\nNLL {result['nll']:.3f} nats over {len(rows):,} tokens, average {result['avg_nll']:.3f}"
                     f"\n(grey: the token the model expected instead){cut}", fontsize=10)  # (a short text's picture is
        # narrow: on one line, the title ran off it)
        fig.savefig(path)
        plt.close(fig)
