"""The one exception type for bad user input (the CLI prints its message as a single line and exits 2), and the
helper that shortens a caught exception to fit into such a line."""


class UserError(Exception):
    """Bad input (config, checkpoint, data file, URI): the message names the problem and what is allowed."""


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, for one-line errors about missing files or weights."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:limit]
