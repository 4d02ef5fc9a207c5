"""jsonargparse glue shared by the command line, ``params`` and the sweep's config checks: building a parsed
config's objects, and the one line to print when parsing or building fails."""

from __future__ import annotations

from typing import Any

from src.errors import UserError


def instantiate(parser: Any, cfg: Any) -> Any:
    """The parsed config with its classes built (jsonargparse ≥ 4.49 renamed ``instantiate_classes``)."""
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg)


def config_error_line(exc: BaseException) -> str:
    """jsonargparse's nested, multi-line parse errors → the most specific line (the one naming the bad key)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    for marker in ("not accepted", "Unrecognized", "does not exist", "Does not validate", "Not a valid", "Expected"):
        for line in lines:
            if marker in line:
                key = next((ln for ln in lines if ln.startswith("Parser key")), lines[0])
                return f"{key.rstrip(':')}: {line}" if key != line else line
    return lines[0] if lines else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise … from`` chain."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def user_facing_error(exc: BaseException) -> str | None:
    """The one line to print for bad input, or None for a genuine bug (which keeps its traceback).

    jsonargparse wraps errors raised while instantiating config classes (our ``UserError`` and the ``ValueError``
    of config validation) in a multi-line ValueError chained to the original; the original is what users need.
    """
    cause = root_cause(exc)
    if isinstance(cause, UserError):
        return str(cause)
    if isinstance(exc, ValueError) and "Union subtypes" in str(exc) and isinstance(cause, ValueError):
        return f"invalid configuration: {str(cause).strip().splitlines()[0]}"
    return None
