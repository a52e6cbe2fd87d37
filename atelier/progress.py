"""Progress reporting without UI code in stages or flows.

Stages take an ``on_progress(done, total)`` callback (k-diffusion style). A run's context carries a
``Reporter`` (the progress sink), chosen by whoever starts the run: ``NullReporter`` for library use and
tests, ``RichReporter`` (one bar per deliverable and stage) for the CLI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Reporter(Protocol):
    def begin(self, label: str, total: int) -> Callable[[int, int], None]: ...
    def end(self, label: str, summary: str) -> None: ...
    def note(self, text: str) -> None: ...


class NullReporter:
    def begin(self, label: str, total: int) -> Callable[[int, int], None]:
        return lambda done, total: None

    def end(self, label: str, summary: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class RichReporter:
    """Rich progress: one bar per (deliverable, stage)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def begin(self, label: str, total: int) -> Callable[[int, int], None]:
        tid = self.progress.add_task(label, total=max(total, 1))
        self.tasks[label] = tid
        return lambda done, total: self.progress.update(tid, completed=done, total=max(total, 1))

    def end(self, label: str, summary: str) -> None:
        tid = self.tasks.pop(label, None)
        if tid is not None:
            self.progress.update(tid, completed=self.progress.tasks[tid].total, description=f"{label} [dim]({summary})")

    def note(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}")


SINKS = ("none", "rich")


@contextlib.contextmanager
def reporter(sink: str) -> Iterator[Reporter]:
    """The reporter for ``sink`` (``none`` | ``rich``), live for the ``with`` block."""
    if sink == "none":
        yield NullReporter()
        return
    if sink != "rich":
        raise ValueError(f"progress: unknown sink {sink!r}; known: {', '.join(SINKS)}")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(), transient=False) as bar:
        yield RichReporter(bar)
