"""Errors that reach the user as one line and exit status 2 (bad usage or bad input)."""


class UserError(Exception):
    """Bad input or usage: the message says what, which file, and what to do.

    The command line prints ``str(err)`` on one line and exits with status 2, without a traceback.
    Library callers can catch it like any exception.
    """


class MissingWeightsError(UserError):
    """Pretrained weights are neither on disk nor downloadable (offline)."""
