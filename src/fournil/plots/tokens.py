"""Where tokenizers cut a text, as a picture: each token on its own coloured box, line after line, one panel per
tokenizer with its counts beside it, so two vocabularies can be compared at a glance."""
from __future__ import annotations

from pathlib import Path

from fournil.plots.canvas import pyplot

COLUMNS = 64  # character cells per line
CELL = 0.15  # inches per cell; a monospace character at FONT points is 0.6 FONT wide
FONT = CELL * 72 / 0.6
ROW = 0.34  # inches per line of text
COLOURS = ["#9fd8e8", "#f5d98b", "#a8dca0", "#e5b3e0"]


def layout(pieces: list[str], columns: int = COLUMNS) -> list[list[tuple[int, str]]]:
    """Lines of (column, token text): tokens kept whole, a line end ending the line (shown as ``↵``)."""
    lines, line, x = [], [], 0
    for text in pieces:
        shown = text.replace("\n", "\u21b5")
        if x and x + len(shown) > columns:
            lines.append(line)
            line, x = [], 0
        line.append((x, shown))
        x += len(shown)
        if "\n" in text:
            lines.append(line)
            line, x = [], 0
    return lines + [line] * bool(line)


def plot_tokens(panels: list[tuple[str, list[str], dict]], path: Path) -> None:
    """``panels``: (tokenizer name, the text of each token, its counts from :func:`compression`)."""
    from matplotlib.patches import Rectangle
    with pyplot() as plt:
        laid = [(name, layout(pieces), c) for name, pieces, c in panels]
        rows = sum(len(lines) + 1.6 for _, lines, _ in laid)
        fig = plt.figure(figsize=(COLUMNS * CELL + 0.4, rows * ROW + 0.2), dpi=100)
        ax = fig.add_axes([0.2 / (COLUMNS * CELL + 0.4), 0, COLUMNS * CELL / (COLUMNS * CELL + 0.4), 1])
        ax.set_xlim(0, COLUMNS)
        ax.set_ylim(rows + 0.3, -0.3)
        ax.axis("off")
        y, n = 0.0, 0
        for name, lines, c in laid:
            header = (f"{name}: {c['tokens']:,} tokens for {c['chars']:,} characters ({c['bytes']:,} bytes), "
                      f"{c['bytes_per_token']:.2f} bytes per token")
            ax.text(0, y + 0.5, header, va="center", weight="bold", fontsize=min(FONT * 0.75, COLUMNS * CELL * 72 / (
                0.65 * len(header))))  # (a bold letter is about 0.65 of the font's size wide: a long one shrinks)
            y += 1.2
            for line in lines:
                for x, text in line:
                    ax.add_patch(Rectangle((x, y + 0.08), len(text), 0.84, facecolor=COLOURS[n % len(COLOURS)],
                                           edgecolor="white", linewidth=1.0))
                    ax.text(x, y + 0.5, text, va="center", ha="left", family="monospace", fontsize=FONT)
                    n += 1
                y += 1
            y += 0.4
        fig.savefig(path)
        plt.close(fig)
