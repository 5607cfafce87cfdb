"""The one rich progress bar layout of mhpo (training, warm-up, benchmark evaluation):

<label>  ━━━━━━━━━━━━━━━━━━  12/50  <fields>  0:01:02  ETA 0:03:10
"""

from __future__ import annotations


def progress_bar(label: str, fields: str, *, console=None, transient: bool = False):
    """A ``rich.progress.Progress`` with the columns above; ``label`` and ``fields`` are rich column
    templates (e.g. ``"reward {task.fields[reward]}"``). Enter it, then add one task."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
