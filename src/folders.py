"""Output folders: checked creatable and writable before any work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from src.errors import UserError


def check_writable_dir(path: str, what: str) -> None:
    """An output folder must be creatable and writable before any work starts.

    A file is created and removed in the nearest existing folder: permission bits say nothing for root, and a
    read-only mount only shows when written to.
    """
    folder = Path(path).expanduser().absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path}: not writable ({probe} is a file, not a folder)")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        raise UserError(f"{what} {path}: not writable (nearest existing folder {probe}: {err.strerror})") from None
