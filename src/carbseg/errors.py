"""Errors that reach the user as one line and exit status 2 (bad usage or bad input)."""


class UserError(Exception):
    """Bad input or usage: the message says what, which file, and what to do.

    The command line prints ``str(err)`` on one line and exits with status 2, without a traceback.
    Library callers can catch it like any exception.
    """


class MissingWeightsError(UserError):
    """Pretrained weights are neither on disk nor downloadable (offline)."""


def one_line(err: BaseException) -> str:
    """The user-facing line of ``err``.

    A UserError raised in a DataLoader worker process (a corrupt image, say) comes back re-raised
    with the worker's whole traceback as its message, the file named only on the last line; that
    last line, without the exception's class name, is what the user needs.
    """
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name, sep, message = last.partition(": ")
        if sep and name.rsplit(".", 1)[-1].endswith("Error"):
            return message
        return last
    return text
