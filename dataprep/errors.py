"""The one error type a user sees: bad input, a bad recipe key, an output folder in the way.

Stages raise `LmpipeError` with a one-line message that names the file (and line) or the key;
the CLI prints that line and exits 2 without a traceback. Anything else is a bug and keeps its
traceback.
"""


class LmpipeError(Exception):
    """A problem with the user's input or settings, reported as one line."""
