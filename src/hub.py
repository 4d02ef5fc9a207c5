"""Hugging Face hub ids: telling ``org/name`` apart from a local path."""

from __future__ import annotations

from pathlib import Path


def is_hub_id(name: str) -> bool:
    """ "org/name" that is no local path (neither it nor its first folder exists here, e.g. checkpoints/x)."""
    path = Path(name).expanduser()
    local = path.exists() or path.parent.exists() and str(path.parent) != "."
    return not local and not name.startswith(("/", ".", "~")) and name.count("/") == 1
