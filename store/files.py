"""Content-addressed asset files: ``<home>/assets/<sha[:2]>/<sha><suffix>``.

Writing is two-phase so a crash never leaves a half-written file where a row points: ``stage()``
writes bytes to a temp file under ``assets/.tmp`` (fsync'd), the caller commits its rows, then
``publish()`` renames the temp file into place (atomic on one file system). Identical bytes share one
file, so a "selected" asset and its draft do not duplicate pixels.
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
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; asset files are meant to be shared
        return Staged(Path(tmp), sha, f"assets/{sha[:2]}/{sha}{suffix}")

    def publish(self, staged: Staged) -> Path:
        final = self.home / staged.rel_path
        if final.exists():
            staged.tmp.unlink(missing_ok=True)  # same bytes already there
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged.tmp, final)
        return final

    def discard(self, staged: Staged) -> None:
        staged.tmp.unlink(missing_ok=True)
