"""What people read, on stderr (rich): progress bars and log lines, so that stdout stays free for data.

The core logs through `logging` (loggers under `ullme_cli`) and draws progress bars; the CLI sets the
level with -q (warnings only, no bars) and -v (debug).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(n, **fields)`; `fields` show beside the bar (loss components, steps/s)."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    ]  # fmt: skip
    with Progress(*columns, console=stderr_console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance


class ConsoleLogHandler(logging.Handler):
    """Each record as one line on the stderr console (above a live progress bar; never wrapped, for grep)."""

    STYLES = {logging.WARNING: "yellow", logging.ERROR: "red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "warning: " if record.levelno == logging.WARNING else ""
            stderr_console.print(prefix + self.format(record), soft_wrap=True, markup=False, highlight=False,
                                 style=self.STYLES.get(record.levelno))  # fmt: skip
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """ullme's log level for a command: -q warnings and errors only, -v everything, else informational."""
    logger = logging.getLogger("ullme_cli")
    logger.handlers = [ConsoleLogHandler()]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if quiet:  # the libraries we call log and draw bars of their own; -q means warnings only from them too
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported
        os.environ.setdefault("DATASETS_VERBOSITY", "warning")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("datasets", "transformers", "huggingface_hub", "mteb", "accelerate"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if "datasets" in sys.modules:  # imported already (a long-lived process): tell it directly
            sys.modules["datasets"].disable_progress_bars()
