"""The rich Console on stderr (so stdout stays clean for scripts), one on stdout for piped output, and the progress bar."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)  # for the few outputs meant to be piped (edgedistill list)


def setup_logging(debug: bool = False) -> None:
    logger = logging.getLogger("edgedistill")
    if not logger.handlers:
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


class _NoProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _NoProgress]:
    """A transient bar with a free-text ``info`` field (loss, accuracy, images/s)."""
    if not enabled:
        yield _NoProgress()
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    ) as progress:
        yield progress
