"""Progress reporting without UI code in stages or flows.

Stages take an ``on_progress(done, total)`` callback (k-diffusion style). The flow asks
``current()`` for the process's reporter; the CLI installs a Rich one with ``reporting(...)``.
The default reporter does nothing, so library use and tests stay quiet.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol


class Reporter(Protocol):
    def begin(self, label: str, total: int) -> Callable[[int, int], None]: ...
    def end(self, label: str, summary: str) -> None: ...


class NullReporter:
    def begin(self, label: str, total: int) -> Callable[[int, int], None]:
        return lambda done, total: None

    def end(self, label: str, summary: str) -> None:
        pass


_current: Reporter = NullReporter()


def current() -> Reporter:
    return _current


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    global _current
    previous, _current = _current, reporter
    try:
        yield reporter
    finally:
        _current = previous
