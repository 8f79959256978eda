"""A live progress line: step, losses, tokens per second and time left."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Progress in percent of the budget (steps or seconds, whichever ends first)."""

    def __init__(self, enabled: bool, start: float = 0.0):
        self.bar = tqdm(
            total=100.0, initial=round(100 * start, 1), disable=not enabled, file=sys.stderr, dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]", mininterval=0.5,
        )

    def update(self, fraction: float, **fields) -> None:
        self.bar.n = round(100 * min(fraction, 1.0), 1)
        self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in fields.items()), refresh=False)
        self.bar.refresh() if self.bar.n >= 100 else self.bar.update(0)

    def close(self) -> None:
        self.bar.close()
