"""The one error type for a user's mistake (a flag, a config value, a path, a data file): the
entry points print its message as one line and exit with status 2, without a traceback. Every
other exception is a bug and keeps its traceback. `CLIP_JAX_DEBUG=1` shows the traceback of a
UsageError too."""


class UsageError(ValueError):
    """A mistake the user fixes by changing a flag, a config value or a file; the message names
    the problem and the fix in one line."""
