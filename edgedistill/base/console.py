"""The rich Console on stderr (so stdout stays clean for scripts), one on stdout for piped output, and the progress bar."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)  # for the few outputs meant to be piped (edgedistill list)
log = logging.getLogger("edgedistill")


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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep exporters' and converters' prints, warnings and INFO logging out of the CLI's output.

    Printed text goes to debug logging. ORT's tools call ``logging.basicConfig`` on import: a placeholder
    handler on the root logger makes that a no-op, so they cannot leave a handler behind.
    """
    root = logging.getLogger()
    handlers, disabled = list(root.handlers), logging.root.manager.disable
    root.addHandler(logging.NullHandler())
    logging.disable(max(disabled, logging.INFO))
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        if sink.getvalue().strip():
            log.debug("%s", sink.getvalue().strip())
