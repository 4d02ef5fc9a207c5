"""Folders written beside their target and renamed into place: a full disk or a kill leaves the last good one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_folder(target: Path) -> Iterator[Path]:
    """Yields a fresh sibling folder to write into; when the block succeeds, it takes ``target``'s place."""
    target = Path(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)  # a rename: the old folder is whole until the new one is in place
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
