"""The progress bar of long loops: image generation and scoring, the fit's evaluation, Taylor scoring."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(label: str, total: int) -> Progress:
    """A bar with count and ETA (off for an empty job); the fit's evaluation and Taylor scoring use it too."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not total)
