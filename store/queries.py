"""Read-side lineage queries: reuse checks, ancestry walks, run reports. Callers own the session."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.files import AssetFiles, FsspecFiles
from store.schema import Asset, Edge, Run, RunAsset, Score, StageRun

STAGE_ORDER = ["reference", "moodboard", "draft", "select", "refine", "mask", "inpaint", "face_restore", "upscale"]


def existing(session: Session, files: AssetFiles | FsspecFiles, keys: Iterable[str]) -> dict[str, Asset]:
    """Assets among ``keys`` that are stored *and* whose file is in place (reusable). ``files``: the store's
    asset files (``store.files``), local or remote."""
    keys = list(keys)
    if not keys:
        return {}
    rows = session.scalars(select(Asset).where(Asset.key.in_(keys)))
    return {a.key: a for a in rows if files.exists(a.path)}


def latest_run(session: Session) -> Run | None:
    return session.scalars(select(Run).order_by(Run.started_at.desc()).limit(1)).first()


def runs(session: Session, limit: int = 50) -> list[Run]:
    return list(session.scalars(select(Run).order_by(Run.started_at.desc()).limit(limit)))


def find_asset(session: Session, ref: str) -> Asset | None:
    """An asset by key, key prefix (>= 6 chars), or by a file's content (any copy of an asset file)."""
    path = Path(ref)
    if path.is_file():
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        # Several recipes can share bytes (a draft and its "selected" twin): prefer the latest stage.
        rows = list(session.scalars(select(Asset).where(Asset.sha256 == sha)))
        if not rows:
            return None
        return max(rows, key=lambda a: (STAGE_ORDER.index(a.stage) if a.stage in STAGE_ORDER else -1, a.created_at))
    if len(ref) >= 6:
        rows = list(session.scalars(select(Asset).where(Asset.key.startswith(ref)).limit(2)))
        if len(rows) == 1:
            return rows[0]
    return None


def parents(session: Session, key: str) -> list[tuple[Edge, Asset]]:
    rows = session.execute(
        select(Edge, Asset).join(Asset, Asset.key == Edge.parent).where(Edge.child == key).order_by(Edge.position)
    )
    return [(e, a) for e, a in rows]


def ancestry(session: Session, key: str) -> dict:
    """The asset and its parents, recursively: {asset, role, parents: [...]} (shared ancestors repeat)."""

    def walk(asset: Asset, role: str | None, depth: int) -> dict:
        node = {"role": role, "asset": asset, "parents": []}
        if depth < 32:
            node["parents"] = [walk(a, e.role, depth + 1) for e, a in parents(session, asset.key)]
        return node

    asset = session.get(Asset, key)
    return walk(asset, None, 0)


def run_assets(session: Session, run_id: str) -> list[tuple[RunAsset, Asset]]:
    rows = session.execute(
        select(RunAsset, Asset).join(Asset, Asset.key == RunAsset.asset_key).where(RunAsset.run_id == run_id)
    )
    return [(ra, a) for ra, a in rows]


def stage_runs(session: Session, run_id: str) -> list[StageRun]:
    return list(session.scalars(select(StageRun).where(StageRun.run_id == run_id).order_by(StageRun.id)))


def scores_by_draft(session: Session, draft_keys: Iterable[str]) -> dict[str, list[Score]]:
    out: dict[str, list[Score]] = defaultdict(list)
    keys = list(draft_keys)
    if keys:
        for sc in session.scalars(select(Score).where(Score.draft_key.in_(keys))):
            out[sc.draft_key].append(sc)
    return out
