"""One error type for every failure that is the user's to fix.

The CLI prints it as one line on stderr and exits with status 2; it never shows a traceback.
"""


class UllmeError(Exception):
    """A user-facing error. The message names the file, line and field where they are known."""


def located(path: str, line: int | None, message: str) -> UllmeError:
    where = f"{path}:{line}" if line is not None else str(path)
    return UllmeError(f"{where}: {message}")
