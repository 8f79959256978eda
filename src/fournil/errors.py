"""The one exception users see: its message says what is wrong and how to fix it; and paths as users read them."""
import os
import shlex
from pathlib import Path


class FournilError(Exception):
    """A problem with the user's input or files. The CLI prints it on one line and exits with code 2."""


class NotAChatModel(FournilError):
    """A conversation given to a model whose tokenizer has no chat template (every character model)."""

    def __init__(self):
        super().__init__("this model has no chat template (it is not a chat model)")


class ContextFull(FournilError):
    """A conversation longer than the model's context: a chat can start over, or send a shorter message."""


def typed(path) -> str:
    """A path as a shell reads it, for the commands that messages suggest: quoted where it holds a space, a quote or a
    letter outside ASCII (``'runs/mon modèle'``), as it is otherwise."""
    return shlex.quote(str(path))


def named(path) -> str:
    """What a file or folder gives the names made from it (a run's, a served model's, an arena contestant's): its
    stem, the current folder's for "." (whose own stem is "")."""
    return Path(os.path.abspath(path)).stem
