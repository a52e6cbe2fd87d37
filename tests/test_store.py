"""The lineage store: crash-safe save order, idempotence, lookups by key prefix and by file.

Every test that takes ``store`` runs on SQLite and on a real PostgreSQL server (tests/postgres.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from atelier.keys import asset_key, derive_seed
from store import NewAsset, NewScore, lineage, open_store, queries, save
from store.schema import Asset, Edge, RunAsset, Score


def _asset(key: str, data: bytes, parents=()) -> NewAsset:
    return NewAsset(key=key, stage="draft", kind="image", campaign="c", deliverable="d", data=data, suffix=".bin",
                    params={"seed": 1}, parents=tuple(parents))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    st = open_store(tmp_path / "home", url)
    lineage.start_run(st, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    return st


def test_keys_are_content_addressed() -> None:
    a = asset_key("draft", 1, {"seed": 1, "prompt": "x"}, [], {"w": "h"})
    assert a == asset_key("draft", 1, {"prompt": "x", "seed": 1}, [], {"w": "h"})  # order-free
    assert a != asset_key("draft", 2, {"seed": 1, "prompt": "x"}, [], {"w": "h"})  # stage version
    assert a != asset_key("draft", 1, {"seed": 2, "prompt": "x"}, [], {"w": "h"})  # params
    assert a != asset_key("draft", 1, {"seed": 1, "prompt": "x"}, [("p", "source")], {"w": "h"})  # parents
    assert a != asset_key("draft", 1, {"seed": 1, "prompt": "x"}, [], {"w": "other"})  # model weights
    assert derive_seed(1234, "hero", "draft", 0) == derive_seed(1234, "hero", "draft", 0)
    assert derive_seed(1234, "hero", "draft", 0) != derive_seed(1234, "hero", "draft", 1)
    assert 0 <= derive_seed(7, "x") < 2**31


def test_save_writes_rows_edges_and_files(store) -> None:
    save(store, "run1", [_asset("k1", b"one")])
    save(store, "run1", [_asset("k2", b"two", [("k1", "source")])],
         [NewScore("dec", "k1", 0.1, 0.2, 0.0, 0.2, 1, True)])
    with store.sessions() as s:
        a = s.get(Asset, "k2")
        assert (store.home / a.path).read_bytes() == b"two"
        assert [(e.parent, e.role) for e, _ in queries.parents(s, "k2")] == [("k1", "source")]
        assert s.get(Score, ("dec", "k1")).kept
        assert set(queries.existing(s, store.files, ["k1", "k2", "nope"])) == {"k1", "k2"}
    assert not list((store.home / "assets" / ".tmp").iterdir())  # temp files were moved into place


def test_save_is_idempotent_and_counts_reuse(store) -> None:
    save(store, "run1", [_asset("k1", b"one")])
    lineage.start_run(store, "run2", "c", "brief.yaml", "0" * 64, "tiny", {})
    save(store, "run2", [_asset("k1", b"one")])
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 1
        assert s.get(RunAsset, ("run1", "k1")).status == "computed"
        assert s.get(RunAsset, ("run2", "k1")).status == "reused"


def test_failed_commit_leaves_no_rows_and_no_files(store) -> None:
    # an edge to a parent that does not exist violates the foreign key: the whole save rolls back
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        save(store, "run1", [_asset("k1", b"one"), _asset("k2", b"two", [("missing", "source")])])
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 0
        assert s.scalar(select(func.count()).select_from(Edge)) == 0
    files = [p for p in (store.home / "assets").rglob("*") if p.is_file()]
    assert files == []


def test_asset_whose_file_never_arrived_is_not_reusable(store) -> None:
    save(store, "run1", [_asset("k1", b"one")])
    with store.sessions() as s:
        path = store.home / s.get(Asset, "k1").path
    path.unlink()  # as if the process died between commit and rename
    with store.sessions() as s:
        assert queries.existing(s, store.files, ["k1"]) == {}


def test_find_asset_by_prefix_and_by_file(store, tmp_path: Path) -> None:
    save(store, "run1", [_asset("abcdef0123", b"pixels")])
    copy = tmp_path / "copied-elsewhere.bin"
    copy.write_bytes(b"pixels")
    with store.sessions() as s:
        assert queries.find_asset(s, "abcdef").key == "abcdef0123"
        assert queries.find_asset(s, str(copy)).key == "abcdef0123"
        assert queries.find_asset(s, "zzzzzz") is None
