"""The one error type a user sees: bad input, a bad recipe key, an output folder in the way.

Stages raise `LmpipeError` with a one-line message that names the file (and line) or the key;
the CLI prints that line and exits 2 without a traceback. An `OSError` (a full disk, a
file-size limit, no permission) is one line too, naming the path (cli/stage.py). Anything else
is a bug and keeps its traceback.
"""

import errno


class LmpipeError(Exception):
    """A problem with the user's input or settings, reported as one line."""


# Errors that only a write gives (the path "cannot be written"); any other (no permission, a
# missing file, EIO) may come from a read as well.
WRITE_ERRNOS = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS)
