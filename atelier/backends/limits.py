"""How many requests one backend may have in flight at once, across everything atelier runs on this machine.

A provider's limits are per account, not per process: a campaign's stages, its Dask worker processes and a
second run started alongside all draw on them. So the bound is held in lock files: backend ``b`` with bound
``n`` has ``n`` slot files in the slots folder, and a request holds an exclusive ``flock`` on one of them while
it is in flight (the call, its polling and its downloads; not the waits between retries). ``flock`` locks
belong to an open file, so threads of one process exclude each other as processes do, and a process that
dies releases its slots with its files.

The bound per backend is ``DEFAULT_CONCURRENCY`` unless ``ATELIER_CONCURRENCY`` says otherwise:
``"openai=2,replicate=8"`` (the backends named), or one number for all of them. The slots folder is
``ATELIER_SLOTS_DIR``, else ``atelier-slots-<uid>`` in the system's temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Requests in flight per backend unless ATELIER_CONCURRENCY says otherwise. A ComfyUI server runs one
# workflow at a time: more in flight only queue there, with their timeouts running.
DEFAULT_CONCURRENCY = {"openai": 4, "replicate": 8, "fal": 8, "together": 4, "comfyui": 2}
POLL = 0.01  # seconds between looks for a free slot


def bounds(known: tuple[str, ...] | list[str] = tuple(DEFAULT_CONCURRENCY)) -> dict[str, int]:
    """The bound of every backend: the defaults, overridden by ``ATELIER_CONCURRENCY``; a malformed setting
    or an unknown backend name is a ``ValueError`` naming the known ones."""
    out = {b: DEFAULT_CONCURRENCY.get(b, 4) for b in known}
    text = os.environ.get("ATELIER_CONCURRENCY", "").strip()
    if not text:
        return out
    if text.isdigit():
        return dict.fromkeys(out, _positive(text, "ATELIER_CONCURRENCY"))
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in out:
            raise ValueError(f"ATELIER_CONCURRENCY: {part!r} is not <backend>=<n>; backends: {', '.join(out)}")
        out[name] = _positive(value.strip(), f"ATELIER_CONCURRENCY {name}")
    return out


def _positive(value: str, what: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{what}: {value!r} is not a whole number of requests >= 1")
    return int(value)


def slots_dir() -> Path:
    folder = os.environ.get("ATELIER_SLOTS_DIR", "").strip()
    path = Path(folder).expanduser() if folder else Path(tempfile.gettempdir()) / f"atelier-slots-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def slot(backend: str, bound: int) -> Iterator[int]:
    """Hold one of ``backend``'s ``bound`` slots (its index) until the block ends, waiting for a free one (the
    wait is not part of a request's timeout: the provider has not been asked yet)."""
    import fcntl

    folder = slots_dir()
    while True:
        for i in range(bound):
            f = open(folder / f"{backend}.{i}.lock", "a+b")  # noqa: SIM115 - held past this loop, closed below
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield i
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(POLL)
