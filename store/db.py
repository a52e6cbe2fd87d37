"""Opening a store: engine + session factory + asset folder for one atelier home."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from store.files import AssetFiles
from store.schema import Base

WRITE = "atelier_write"  # connection execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)

_stores: dict[tuple[str, str], "Store"] = {}


class _Session(Session):
    """A session whose explicit ``begin()`` means "this transaction writes".

    atelier writes with ``with store.sessions.begin() as s:`` and reads with ``with store.sessions() as s:``.
    On SQLite a write transaction takes the write lock up front (``BEGIN IMMEDIATE``): a check-then-insert
    (``s.get`` → ``s.add``) cannot race another process, and a writer waits (busy_timeout) instead of failing
    with "database is locked" when a deferred transaction that has already read tries to start writing.
    Reads use a plain deferred ``BEGIN``: a consistent snapshot that never blocks writers (WAL).
    """

    def begin(self, nested: bool = False):  # noqa: ANN201
        transaction = super().begin(nested)
        if not nested:
            self.connection(execution_options={WRITE: True})  # procured now, so BEGIN IMMEDIATE comes first
        return transaction


@dataclass
class Store:
    url: str
    home: Path
    sessions: sessionmaker[Session]
    files: AssetFiles


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'lineage.db'}"


def open_store(home: Path, url: str | None = None) -> Store:
    """The store for ``home`` (created on first use), cached per process."""
    home = Path(home).resolve()
    url = url or default_url(home)
    cache_key = (str(home), url)
    if cache_key in _stores:
        return _stores[cache_key]
    home.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # pysqlite's implicit BEGIN off: _begin below emits it
            cur = dbapi_conn.cursor()
            # busy_timeout first: concurrent runs wait instead of failing, and switching a new file to WAL may wait.
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")
    # One write transaction, so processes opening a fresh home at once do not both try CREATE TABLE.
    with engine.connect() as conn, conn.execution_options(**{WRITE: True}).begin():
        Base.metadata.create_all(conn)
    sessions = sessionmaker(engine, class_=_Session, expire_on_commit=False)
    store = Store(url=url, home=home, sessions=sessions, files=AssetFiles(home))
    _stores[cache_key] = store
    return store
