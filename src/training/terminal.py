"""What a fit prints: Lightning's per-Trainer banner lines and two benign warnings are dropped.

Each stage is its own ``Trainer``, so without this every stage repeats the accelerator banner, the litlogger tip,
a torch pytree deprecation raised inside Lightning, the eval-mode warning (the frozen teacher inside every
distillation module is in eval mode on purpose) and "`Trainer.fit` stopped: `max_steps=…` reached"; a first run
also prints MLflow's database-creation INFO lines. Only these exact messages are filtered; every other log line and
warning still shows.
"""

from __future__ import annotations

import logging
import warnings

BANNER_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "`Trainer.fit` stopped: `max_")
"""Lightning's rank-zero info lines repeated by every Trainer (a stage ending at its step budget is no news; "no
training batches" still shows)."""
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")
"""Loggers whose INFO lines only narrate the creation of a new MLflow database; warnings still show."""
BANNER_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators",
)
BENIGN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch ≥ 2.9 vs lightning/pytorch/utilities/_pytree.py
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen teacher, on purpose
)


class _DropBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(BANNER_PREFIXES)


def quiet_lightning() -> None:
    """Install the filters (idempotent; warning filters are re-added because pytest and ``catch_warnings`` reset
    them)."""
    for name in BANNER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBanner) for f in logger.filters):
            logger.addFilter(_DropBanner())
    for message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
