"""Content-addressed asset files: ``<home>/assets/<sha[:2]>/<sha><suffix>``.

Writing is two-phase so a crash never leaves a half-written file where a row points: ``stage()``
writes bytes to a temp file under ``assets/.tmp`` (fsync'd), the caller commits its rows, then
``publish()`` renames the temp file into place (atomic on one file system). Identical bytes share one
file, so a "selected" asset and its draft do not duplicate pixels.

A temp file is named ``<sha256>.<random><suffix>``, so the bytes of a row committed by a process that died
before its rename can be found again (``find_staged``) and moved into place instead of being recomputed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Staged:
    tmp: Path
    sha256: str
    rel_path: str  # where publish() puts it, relative to home


class AssetFiles:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.tmp_dir = home / "assets" / ".tmp"

    def path(self, rel_path: str) -> Path:
        return self.home / rel_path

    def stage(self, data: bytes, suffix: str) -> Staged:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256(data).hexdigest()
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{sha}.", suffix=suffix)
        # mkstemp makes 0600 and asset files are meant to be shared. chmod the descriptor, not the path: once
        # written, the file may already be moved into place by another save() (see find_staged).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Staged(Path(tmp), sha, f"assets/{sha[:2]}/{sha}{suffix}")

    def publish(self, staged: Staged) -> Path:
        final = self.home / staged.rel_path
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staged.tmp, final)
                return final
            except FileNotFoundError:
                if not final.exists():
                    raise
                # another process moved these very bytes into place first (see find_staged)
        staged.tmp.unlink(missing_ok=True)  # same bytes already there
        return final

    def find_staged(self, sha256: str, suffix: str) -> Staged | None:
        """A complete temp file holding exactly ``sha256`` (left by a save() that committed, then died)."""
        for tmp in sorted(self.tmp_dir.glob(f"{sha256}.*{suffix}")):
            try:
                if file_sha256(tmp) == sha256:  # a name alone may belong to a file still being written
                    return Staged(tmp, sha256, f"assets/{sha256[:2]}/{sha256}{suffix}")
            except FileNotFoundError:
                continue  # published or discarded meanwhile
        return None

    def discard(self, staged: Staged) -> None:
        staged.tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
