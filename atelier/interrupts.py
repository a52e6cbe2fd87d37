"""Ctrl-C and SIGTERM during a run: stop within moments, but never in the middle of a store write.

A signal stops a run where it finds it, as an exception: SIGINT raises ``KeyboardInterrupt``; SIGTERM raises
``Interrupted`` (``atelier run`` installs ``terminate_as_interrupt``), or Prefect's ``TerminationSignal`` while
a flow runs (Prefect puts its own SIGTERM handler in place for the flow's duration, and calls ours after).
``signal_of`` tells these apart from errors, so the flow can record the run as cancelled and the CLI can
say so in one line.

``deferred()`` is what keeps the store whole: ``store.lineage`` runs each write (temp files → rows → commit →
files moved into place) inside it, and a signal that arrives meanwhile is held and raised as the block
ends. A write takes milliseconds; a model call, where a run spends its time, is interrupted at once.
Signals are delivered to the main thread only: elsewhere (a Dask worker's task thread) both are no-ops.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` (code that handles one handles both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(exc: BaseException) -> int | None:
    """The signal ``exc`` stands for (SIGINT, SIGTERM), or None for any other exception."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    prefect_exceptions = sys.modules.get("prefect.exceptions")  # only a flow raises it: prefect is loaded then
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return exc.signal
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` (by default it would end the process on the spot)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers in place before it.

    Nested blocks hand a held signal outwards. A handler installed outside Python (``getsignal`` is None)
    cannot be put back, so that signal is left alone."""
    if not _in_main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for signum in HANDLED:
        if signal.getsignal(signum) is not None:
            previous[signum] = signal.signal(signum, lambda n, _frame: held.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)  # the restored handler runs now (raising, as it would have)
