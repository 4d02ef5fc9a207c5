"""A short, stable hash of a JSON-able description: what a stage's or a study's results depend on.

A finished stage or an Optuna study records it; a rerun whose description hashes differently is refused instead of
resuming from work done under other settings. Keys are sorted, values not JSON-native are written with ``str``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_hash(obj: Any) -> str:
    """The first 16 hex digits of the sha256 of ``obj`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
