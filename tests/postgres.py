"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, one server per test session.

``initdb`` into a fresh folder, ``postgres`` on 127.0.0.1 at a free port (and a unix socket in the same
folder), trust authentication for the ``atelier`` role; each test gets its own database. PostgreSQL refuses
to run as root, so under root (CI) the server runs as the package's ``postgres`` user (``runuser``).

Without the binaries the Postgres tests are skipped, except when ``CI`` is set: there they must run, so a
server that cannot start fails them (``make test-deps`` installs the package).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

USER = "atelier"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        # Not under pytest's tmp_path: its parents are private to root, and the server may run as `postgres`.
        self.dir = Path(tempfile.mkdtemp(prefix="atelier-pg-"))
        self.data, self.port = self.dir / "data", _free_port()
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.log = self.dir / "server.log"

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd[:1])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        # fsync off: a test server need not survive a power cut, and it makes CREATE DATABASE fast.
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c synchronous_commit=off "
                        f"-c full_page_writes=off -c max_connections=200")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (skipped where there is none, failing on CI)."""
    bin_dir = _bin_dir()
    on_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if bin_dir is None:
        if on_ci:
            pytest.fail("CI: PostgreSQL is not installed (/usr/lib/postgresql/*/bin); `make test-deps` installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    t0 = time.monotonic()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        log = server.log.read_text()[-2000:] if server.log.exists() else ""
        server.stop()
        if on_ci:
            pytest.fail(f"CI: PostgreSQL did not start: {exc}\n{log}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    print(f"\nPostgreSQL {bin_dir.parts[-2]} on 127.0.0.1:{server.port}, started in {time.monotonic() - t0:.1f}s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()
