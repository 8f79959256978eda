"""What counts as text: characters only. JSON can escape half of a UTF-16 surrogate pair ("\\ud83d" without its
partner), and Python keeps bytes that were not UTF-8 (from a command line, a terminal) as such halves; no tokenizer
reads them, so each way text comes in checks for them and says where."""
from __future__ import annotations

HALF_PAIR = ("holds half of a UTF-16 surrogate pair (an escape \\ud800 to \\udfff without its partner), which is "
             "not text")


def is_text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def unpaired(value, place: str = "") -> str | None:
    """Where in ``value`` (a str, or the lists and objects of a JSON value) a string is not text, as
    ``messages.0.content`` ("" for ``value`` itself); None if every string is text."""
    if isinstance(value, str):
        return None if is_text(value) else place
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (str, list, dict)) and (found := unpaired(item, f"{place}.{key}" if place else str(key))) \
                is not None:
            return found
    return None
