"""Lineage store: SQLAlchemy schema, content-addressed asset files, and the one place lineage is written."""

from store.db import Store, open_store
from store.lineage import NewAsset, NewScore, save

__all__ = ["Store", "open_store", "NewAsset", "NewScore", "save"]
