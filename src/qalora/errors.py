"""The one exception type a user sees as a one-line message (the CLI prints it, no traceback)."""


class QaloraError(Exception):
    """A problem with the user's input: the message names the value and what is accepted."""
