"""Content-addressed asset files: ``<home>/assets/<sha[:2]>/<sha><suffix>``.

Writing is two-phase so a crash never leaves a half-written file where a row points: ``stage()``
writes bytes to a temp file under ``assets/.tmp`` (fsync'd), the caller commits its rows, then
``publish()`` renames the temp file into place (atomic on one file system). Identical bytes share one
file, so a "selected" asset and its draft do not duplicate pixels.

A temp file is named ``<sha256>.<random><suffix>``, so the bytes of a row committed by a process that died
before its rename can be found again (``find_staged``) and moved into place instead of being recomputed.

``--assets URL`` (any fsspec URL: ``s3://bucket/atelier``, ``file:///mnt/shared``, ``memory://x``) puts the same
layout (``<url>/<sha[:2]>/<sha><suffix>``, temp files in ``<url>/.tmp``) in a shared object store instead:
``FsspecFiles``. Rows do not change (``path`` is still ``assets/<sha[:2]>/...``), so a store can move between
the two. Stages read local files, so remote assets are read through a cache under ``<home>/cache/assets``:
named by content, a cached file is valid forever.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path


@dataclass(frozen=True)
class Staged:
    tmp: Path | str  # a local Path (AssetFiles), or a path in the fsspec filesystem (FsspecFiles)
    sha256: str
    rel_path: str  # where publish() puts it, relative to home


class AssetFiles:
    """Asset files in ``<home>/assets`` (the default)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.tmp_dir = home / "assets" / ".tmp"
        self.location = str(home / "assets")

    def path(self, rel_path: str) -> Path:
        return self.home / rel_path

    def exists(self, rel_path: str) -> bool:
        """Whether the asset file is in place (what reuse checks)."""
        return (self.home / rel_path).exists()

    def stage(self, data: bytes, suffix: str) -> Staged:
        """``data`` in a new temp file, fsync'd. On an error (a full disk) nothing is left behind."""
        sha = hashlib.sha256(data).hexdigest()
        rel = f"assets/{sha[:2]}/{sha}{suffix}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # The folder publish() moves the file into, made now: after the commit, a full disk must not stop the move.
        (self.home / rel).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{sha}.", suffix=suffix)
        try:
            # mkstemp makes 0600 and asset files are meant to be shared. chmod the descriptor, not the path: once
            # written, the file may already be moved into place by another save() (see find_staged).
            os.fchmod(fd, 0o644)
            _write_all(fd, data)
            os.fsync(fd)  # where a full disk may show only now (delayed allocation, network file systems)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return Staged(Path(tmp), sha, rel)

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

    # What `atelier doctor` needs: listing, hashing, ages, quarantine.
    def list_files(self) -> set[str]:
        """Asset files (paths relative to the home), leaving out ``assets/.tmp``."""
        root = self.home / "assets"
        if not root.is_dir():
            return set()
        return {str(p.relative_to(self.home)) for p in root.rglob("*")
                if p.is_file() and p.relative_to(root).parts[0] != ".tmp"}

    def temp_files(self) -> dict[Path, float]:
        """Temp files and their age in seconds."""
        out = {p: self.age(p) for p in (self.tmp_dir.glob("*") if self.tmp_dir.is_dir() else ())}
        return {p: age for p, age in out.items() if age is not None}

    def age(self, tmp: Path) -> float | None:
        try:
            return max(0.0, time.time() - tmp.stat().st_mtime)
        except FileNotFoundError:  # moved into place or deleted meanwhile
            return None

    def temp_exists(self, tmp: Path | str) -> bool:
        return Path(tmp).exists()

    def describe(self, tmp: Path | str) -> str:
        return str(Path(tmp).relative_to(self.home))

    def sha256(self, rel_path: str) -> str:
        return file_sha256(self.home / rel_path)

    def quarantine(self, rel_path: str) -> str:
        """Move the file to ``<home>/quarantine/<rel_path>`` (``.1``, ``.2``... if taken); returns where to."""
        target = self.home / "quarantine" / rel_path
        n = 0
        while target.exists():
            n += 1
            target = self.home / "quarantine" / f"{rel_path}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.home / rel_path, target)
        return str(target.relative_to(self.home))


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it, as when a disk fills)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FsspecFiles:
    """Asset files in any fsspec filesystem, same protocol as ``AssetFiles``; read through a local cache.

    Crash safety holds on object stores too: a temp object is written whole (``pipe_file``), and
    ``publish`` moves it to its content-addressed name only after the rows committed (on S3 a move is a
    copy then a delete: the final object still appears whole, and identical bytes may be written twice).
    """

    def __init__(self, home: Path, url: str) -> None:
        import fsspec

        self.home, self.location = home, url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.tmp_dir = f"{self.root}/.tmp"
        self.cache = home / "cache" / "assets"  # <sha[:2]>/<sha><suffix>, like the store

    def remote(self, rel_path: str) -> str:
        """Where ``rel_path`` (``assets/ab/ab12….png``) lives in the filesystem."""
        return f"{self.root}/{rel_path.removeprefix('assets/')}"

    def exists(self, rel_path: str) -> bool:
        return self.fs.exists(self.remote(rel_path))

    def path(self, rel_path: str) -> Path:
        """A local copy of the asset file, downloaded once (its name is its content's hash)."""
        local = self.cache / rel_path.removeprefix("assets/")
        if not local.exists():
            data = self.fs.cat_file(self.remote(rel_path))
            if hashlib.sha256(data).hexdigest() != local.stem:
                raise OSError(f"{self.remote(rel_path)}: content does not match its name (run `atelier doctor`)")
            self._cache(local, data)
        return local

    def _cache(self, local: Path, data: bytes) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, local)  # whole or absent: a reader never sees a partial cache file

    def stage(self, data: bytes, suffix: str) -> Staged:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"assets/{sha[:2]}/{sha}{suffix}"
        tmp = f"{self.tmp_dir}/{sha}.{uuid.uuid4().hex[:12]}{suffix}"
        self.fs.makedirs(self.tmp_dir, exist_ok=True)
        try:
            self.fs.pipe_file(tmp, data)
        except BaseException:
            self.discard(Staged(tmp, sha, rel))  # a part written before a full disk, say
            raise
        # These bytes have this hash whatever happens to the rows: caching them now saves a download later.
        local = self.cache / rel.removeprefix("assets/")
        if not local.exists():
            self._cache(local, data)
        return Staged(tmp, sha, rel)

    def publish(self, staged: Staged) -> str:
        final = self.remote(staged.rel_path)
        if not self.fs.exists(final):
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            try:
                self.fs.mv(staged.tmp, final)
                return final
            except FileNotFoundError:
                if not self.fs.exists(final):
                    raise
        self.discard(staged)  # same bytes already there
        return final

    def find_staged(self, sha256: str, suffix: str) -> Staged | None:
        for tmp in sorted(self.fs.glob(f"{self.tmp_dir}/{sha256}.*{suffix}")):
            try:
                if hashlib.sha256(self.fs.cat_file(tmp)).hexdigest() == sha256:
                    return Staged(tmp, sha256, f"assets/{sha256[:2]}/{sha256}{suffix}")
            except FileNotFoundError:
                continue
        return None

    def discard(self, staged: Staged) -> None:
        try:
            self.fs.rm_file(staged.tmp)
        except FileNotFoundError:
            pass

    # What `atelier doctor` needs: listing, hashing, ages, quarantine (into ``<url>/.quarantine``).
    def list_files(self) -> set[str]:
        prefix = self.root + "/"
        out = set()
        for path in self.fs.find(self.root):
            rest = path[len(prefix):] if path.startswith(prefix) else path
            if rest.split("/", 1)[0] not in (".tmp", ".quarantine"):
                out.add(f"assets/{rest}")
        return out

    def temp_files(self) -> dict[str, float]:
        paths = self.fs.ls(self.tmp_dir, detail=False) if self.fs.exists(self.tmp_dir) else []
        out = {p: self.age(p) for p in paths}
        return {p: age for p, age in out.items() if age is not None}

    def age(self, tmp: str) -> float | None:

        try:
            modified = self.fs.modified(tmp)
        except FileNotFoundError:
            return None
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        return max(0.0, time.time() - modified.timestamp())

    def temp_exists(self, tmp: Path | str) -> bool:
        return self.fs.exists(str(tmp))

    def describe(self, tmp: Path | str) -> str:
        return self.fs.unstrip_protocol(str(tmp))

    def sha256(self, rel_path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.remote(rel_path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def quarantine(self, rel_path: str) -> str:
        target = f"{self.root}/.quarantine/{rel_path.removeprefix('assets/')}"
        n, base = 0, target
        while self.fs.exists(target):
            n += 1
            target = f"{base}.{n}"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(self.remote(rel_path), target)
        return self.describe(target)


def open_files(home: Path, url: str | None) -> AssetFiles | FsspecFiles:
    """``<home>/assets`` when ``url`` is None, else the fsspec location ``url``. Raises ``StoreError`` for a
    protocol fsspec does not know or whose package is not installed (nothing is written)."""
    if not url:
        return AssetFiles(home)
    import fsspec

    from atelier.errors import StoreError

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StoreError("--assets", f"unknown fsspec protocol {protocol!r} in {url!r}") from None
    except ImportError as exc:
        raise StoreError("--assets", f"{url!r} needs a package that is not installed: {exc}") from None
    return FsspecFiles(home, url)
