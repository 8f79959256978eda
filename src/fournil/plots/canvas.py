"""matplotlib as fournil's pictures use it: drawn into files, never a window, and text drawn as it is written."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def pyplot():
    """``matplotlib.pyplot`` for a picture drawn inside the ``with`` (imported then: it takes most of a second), its
    text not read as TeX (a token such as ``$$`` or ``$x$`` failed to draw or lost its dollars), and without a warning
    for each character the font lacks (a vocabulary's Chinese tokens and emoji: hundreds; they are drawn as boxes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield plt
