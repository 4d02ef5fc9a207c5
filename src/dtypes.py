"""Torch dtypes by the names configs and flags use (``teacher.dtype: bfloat16``), and the device ``auto`` picks.

The one map from dtype name to ``torch.dtype``: the teacher's dtype, prepare-data's, ``evaluate --dtype`` and FSDP's
``mixed_precision`` all accept exactly its keys.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" → cuda when available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
