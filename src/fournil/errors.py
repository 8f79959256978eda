"""The one exception users see: its message says what is wrong and how to fix it."""


class FournilError(Exception):
    """A problem with the user's input or files. The CLI prints it on one line and exits with code 2."""
