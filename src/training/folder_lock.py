"""One writer per output folder: a second ``fit`` into the same folder is refused with the holder's name.

The lock is an ``flock`` on ``<folder>/.lock``: the kernel drops it when its process ends, however it ends, so a
killed run never leaves a stale lock behind. The file records who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from src.errors import UserError


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` for this process; UserError naming the holder when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{what} {folder}: in use by {holder}; wait for it to end or choose another {what}") from None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command})\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
