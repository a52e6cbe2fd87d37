"""Opening a store: engine + session factory + asset files for one atelier home.

The schema is created and upgraded by Alembic (``store/migrations``, shipped inside the package):
``open_store`` runs ``alembic upgrade head`` when the database is not at the head revision, inside one
write transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-level advisory lock), so several
processes opening a fresh store at once create the tables once. A store already at the head costs one
``SELECT`` and no Alembic import (~0.3 s of every command): the database's revision is read from its
``alembic_version`` table, the head from the migration files' text.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from store.files import AssetFiles, FsspecFiles, open_files

WRITE = "atelier_write"  # connection execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema stores had before migrations existed (made by create_all)
_PG_MIGRATE_LOCK = 0x6174656C  # pg_advisory_xact_lock key ("atel") held while migrating

class _Session(Session):
    """A session whose explicit ``begin()`` means "this transaction writes".

    atelier writes with ``with store.sessions.begin() as s:`` and reads with ``with store.sessions() as s:``.
    On SQLite a write transaction takes the write lock up front (``BEGIN IMMEDIATE``): a check-then-insert
    (``s.get`` → ``s.add``) cannot race another process, and a writer waits (busy_timeout) instead of failing
    with "database is locked" when a deferred transaction that has already read tries to start writing.
    Reads use a plain deferred ``BEGIN``: a consistent snapshot that never blocks writers (WAL).
    On PostgreSQL writers run side by side (READ COMMITTED): ``store.lineage`` inserts with ``ON CONFLICT``
    instead of relying on a check-then-insert.
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
    files: AssetFiles | FsspecFiles
    saves: int = 0  # save() calls made through this store (the crash tests' fault points count them)

    def count_save(self) -> int:
        self.saves += 1
        return self.saves

    @property
    def dialect(self) -> str:
        return self.sessions.kw["bind"].dialect.name


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'lineage.db'}"


def open_store(home: Path, url: str | None = None, assets: str | None = None) -> Store:
    """The store for ``home`` (created on first use, migrated to the current schema).

    ``url``: SQLAlchemy URL of the lineage database (default SQLite ``<home>/lineage.db``). ``assets``: fsspec
    URL of the asset files; without it, ``$ATELIER_ASSETS``, else ``<home>/assets``. Each call opens the store
    anew: a run opens it once and passes it on. A database that cannot be reached or an unknown asset
    protocol raises ``StoreError`` before anything is written.
    """
    home = Path(home).resolve()
    url = url or default_url(home)
    assets = assets or os.environ.get("ATELIER_ASSETS") or None
    files = open_files(home, assets)
    engine = _engine(url, home)
    _check_connects(engine, url)
    migrate(engine)
    home.mkdir(parents=True, exist_ok=True)  # models, outputs, asset cache
    sessions = sessionmaker(engine, class_=_Session, expire_on_commit=False)
    return Store(url=url, home=home, sessions=sessions, files=files)


def _engine(url: str, home: Path) -> Engine:
    from atelier.errors import StoreError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError("--store", f"not a SQLAlchemy URL: {url!r}") from None
    try:
        engine = create_engine(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise StoreError("--store", f"{parsed.render_as_string(hide_password=True)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        if url == default_url(home):
            home.mkdir(parents=True, exist_ok=True)

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
    return engine


def _check_connects(engine: Engine, url: str) -> None:
    from atelier.errors import StoreError

    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StoreError("--store", f"cannot connect to {shown}: {reason}") from None


# --------------------------------------------------------------------------------------------- migrations
def alembic_config(connection: Connection | None = None) -> Any:
    """Alembic's configuration for the packaged migrations (no alembic.ini); ``connection`` goes to env.py."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)


@cache
def head_revision() -> str:
    """The newest migration's revision id, read from ``migrations/versions/*.py`` without importing Alembic:
    the one ``revision`` that no file names as its ``down_revision`` (tests check it against Alembic's own
    ``ScriptDirectory``). One head only: a branched history is an error here, as in ``alembic upgrade head``."""
    revisions, parents = set(), set()
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        found = dict((m.group(1), ast.literal_eval(m.group(2))) for m in _REVISION_LINE.finditer(path.read_text()))
        if "revision" not in found:
            continue  # __init__.py
        revisions.add(found["revision"])
        down = found.get("down_revision")
        parents.update([down] if isinstance(down, str) else down or ())
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"store migrations: expected one head revision, found {sorted(heads)}")
    return heads.pop()


def current_revision(conn: Connection) -> str | None:
    """The database's revision (its ``alembic_version`` row), None for a database Alembic never stamped."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise RuntimeError(f"store: several revisions in alembic_version ({', '.join(sorted(rows))}): branched")
    return rows[0] if rows else None


def migrate(engine: Engine) -> None:
    """``alembic upgrade head``, once, under the store's write lock; a store already at head costs one read
    (and no Alembic import)."""
    with engine.connect() as conn:
        if current_revision(conn) == head_revision():
            return
    from alembic import command

    with engine.connect() as conn, conn.execution_options(**{WRITE: True}).begin():
        if conn.dialect.name == "postgresql":  # held until this transaction ends; others wait, then see head
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATE_LOCK})
        cfg = alembic_config(conn)
        if current_revision(conn) is None and inspect(conn).has_table("assets"):
            command.stamp(cfg, BASELINE)  # a store made by create_all before migrations: it is the baseline
        command.upgrade(cfg, "head")
