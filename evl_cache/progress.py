"""Rich progress display for long runs: counts, rate, ETA; silent when disabled."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ExtractProgress:
    """Videos done / failed, clip-views per second and ETA for an extraction run."""

    def __init__(self, total: int, enabled: bool = True, views: int = 1) -> None:
        self.total, self.enabled, self.views = total, enabled, views
        self.done = self.failed = 0
        self.started = time.time()
        self._progress = Progress(
            TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
            TextColumn("done {task.fields[done]} failed {task.fields[failed]}"),
            TextColumn("{task.fields[rate]:.2f} clips/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled, transient=False,
        )
        self._task = None

    def __enter__(self) -> "ExtractProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task("extract", total=self.total, done=0, failed=0, rate=0.0)
        return self

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        elapsed = max(time.time() - self.started, 1e-9)
        rate = (self.done + self.failed) * self.views / elapsed
        self._progress.update(self._task, advance=done + failed, done=self.done, failed=self.failed, rate=rate)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def reclassify_failed(self, count: int) -> None:
        """Videos counted as processed when their backbone batch finished turned out to have failed
        decoding (known only when their shard lands)."""
        self.done -= count
        self.failed += count
        self._progress.update(self._task, done=self.done, failed=self.failed)
