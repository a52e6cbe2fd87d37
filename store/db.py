"""Opening a store: engine + session factory + asset folder for one atelier home."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from store.files import AssetFiles
from store.schema import Base

_stores: dict[tuple[str, str], "Store"] = {}


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
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA busy_timeout=30000")  # concurrent runs wait instead of failing
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    Base.metadata.create_all(engine)
    store = Store(url=url, home=home, sessions=sessionmaker(engine, expire_on_commit=False), files=AssetFiles(home))
    _stores[cache_key] = store
    return store
