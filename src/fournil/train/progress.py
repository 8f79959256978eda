"""Progress of a training run: a live bar on a terminal, one line per validation in a log."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Progress in percent of the budget (steps or seconds, whichever ends first)."""

    def __init__(self, enabled: bool, start: float = 0.0):
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=100.0, initial=round(100 * start, 1), disable=not self.live, file=sys.stderr, dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]", mininterval=0.5,
        )

    def update(self, fraction: float, milestone: bool, **fields) -> None:
        """``milestone`` marks a validation: the only updates a log (not a terminal) gets."""
        text = ", ".join(f"{k} {v}" for k, v in fields.items())
        if self.live:
            self.bar.n = round(100 * min(fraction, 1.0), 1)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(0)
        elif self.enabled and milestone:
            print(f"{100 * min(fraction, 1.0):5.1f}% {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
