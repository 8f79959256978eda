"""A sequence-to-sequence task made by code, with no download: numbers in digits to French words.

``1 234`` -> ``mille deux cent trente-quatre``, from 0 to 999 999, with the traditional rules: a hyphen between
tens and units (``vingt-deux``, ``quatre-vingt-dix-sept``) except where ``et`` joins them (``vingt et un``,
``soixante et onze``, but ``quatre-vingt-un``); ``quatre-vingts`` and ``deux cents`` take an ``s`` only when they
end the number (``quatre-vingt mille``, ``deux cent mille``, ``deux cent un``); ``mille`` never does, and is not
preceded by ``un``.
"""
from __future__ import annotations

import random

from fournil.errors import FournilError

UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
         "treize", "quatorze", "quinze", "seize"]
TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
LARGEST = 999_999


def _below_100(n: int, last: bool) -> str:
    """1 to 99; ``last`` when nothing follows in the number (``quatre-vingts`` then takes its ``s``)."""
    if n < 17:
        return UNITS[n]
    if n < 20:
        return "dix-" + UNITS[n - 10]
    tens, unit = divmod(n, 10)
    if tens == 7:  # 70-79 count on from soixante: soixante-dix, soixante et onze, soixante-douze...
        return "soixante et onze" if n == 71 else "soixante-" + _below_100(n - 60, last)
    if tens in (8, 9):  # 80-99 count on from quatre-vingts, never with "et"
        return ("quatre-vingts" if last else "quatre-vingt") if n == 80 else "quatre-vingt-" + _below_100(n - 80, last)
    if unit == 0:
        return TENS[tens]
    return f"{TENS[tens]} et un" if unit == 1 else f"{TENS[tens]}-{UNITS[unit]}"


def _below_1000(n: int, last: bool) -> str:
    """1 to 999: ``cent`` alone for one hundred, ``cents`` for several hundreds that end the number."""
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds:
        plural = hundreds > 1 and rest == 0 and last
        words.append(("" if hundreds == 1 else UNITS[hundreds] + " ") + ("cents" if plural else "cent"))
    if rest:
        words.append(_below_100(rest, last))
    return " ".join(words)


def in_words(n: int) -> str:
    """The French words of ``n`` (0 to 999 999)."""
    if not 0 <= n <= LARGEST:
        raise ValueError(f"{n} is outside 0 to {LARGEST:,}")
    if n == 0:
        return UNITS[0]
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words.append("mille" if thousands == 1 else _below_1000(thousands, last=False) + " mille")
    if rest:
        words.append(_below_1000(rest, last=True))
    return " ".join(words)


def in_digits(n: int) -> str:
    """Digits grouped by three with a space, as French writes them: ``1 234``, ``999 999``."""
    return f"{n:,}".replace(",", " ")


def as_source(text: str) -> str:
    """A number typed as the data's sources write it (``1234`` -> ``1 234``): the model has only seen groups of three,
    and read ``1234`` as ``123`` (``cent vingt-trois``)."""
    digits = "".join(text.split())
    if not (digits.isascii() and digits.isdigit() and int(digits) <= LARGEST):
        raise FournilError(f"{text!r} is not a number from 0 to {in_digits(LARGEST)}, which nombres writes in words")
    return in_digits(int(digits))


SHARES = {1_000: 0.2, 10_000: 0.35, 100_000: 0.45}  # of the numbers above 999, by their lowest: 4, 5 and 6 digits


def nombres(count: int = 40_000, seed: int = 1337) -> list[tuple[str, str]]:
    """``count`` distinct (digits, words) pairs in a seeded order: every number below 1,000, then numbers of four,
    five and six digits (a fifth, a third and the rest; uniform within their length, so that the shorter ones are
    not swamped by the 900,000 of six digits)."""
    if not 1_000 < count <= 1_000 + 9_000 / SHARES[1_000]:
        raise ValueError(f"count must be between 1,001 and {1_000 + 9_000 / SHARES[1_000]:,.0f} (got {count:,})")
    rng = random.Random(seed)
    numbers = list(range(1000))
    for low, share in SHARES.items():
        numbers += rng.sample(range(low, low * 10), round(share * (count - 1000)))
    rng.shuffle(numbers)
    return [(in_digits(n), in_words(n)) for n in numbers]


COPIES = {100: 40, 1_000: 4}  # in the training split: each number below 100 forty times, below 1,000 four times


def practised(train: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The training pairs with the short numbers repeated. There are 90 numbers of one or two digits among 36,000
    and 810 of three: seen once each in the default 500 steps, the model wrote ``0`` as ``mille``, ``1`` as ``onze``
    and ``71 080`` as ``soixante et onze`` (87 % of 0 to 99 right); repeated, every one it was trained on came out
    right. Only the training split gets copies: val and test keep one of each number, none seen in training."""
    def copies(pair: tuple[str, str]) -> int:
        n = int(pair[0].replace(" ", ""))
        return next((times for below, times in COPIES.items() if n < below), 1)

    return train + [pair for pair in train for _ in range(copies(pair) - 1)]
