"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class CtxdraftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
