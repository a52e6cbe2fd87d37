"""Alembic environment for the lineage store, run programmatically by ``store.db.migrate``.

The caller hands over a connection already inside its write transaction (SQLite ``BEGIN IMMEDIATE``, or a
PostgreSQL advisory lock), so the migrations run inside it and several processes opening a fresh store at
once cannot both create the tables. Nothing here reads alembic.ini or opens a connection of its own.
"""

from alembic import context

from store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("store migrations run through store.db.migrate(), which provides the connection")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
with context.begin_transaction():  # the caller's transaction: alembic sees it is inside one and does not commit
    context.run_migrations()
