"""Read-side lineage queries: reuse checks, ancestry walks, run reports. Callers own the session."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.files import AssetFiles, FsspecFiles
from store.schema import Asset, Edge, Gate, Rating, Review, Run, RunAsset, Score, StageRun

STAGE_ORDER = ["reference", "moodboard", "draft", "vary", "select", "pick", "refine", "mask", "inpaint", "face_restore",
               "upscale"]
RATING_OPS = (">=", "<=", ">", "<", "=")  # ``--rating`` comparisons, longest first


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


def latest_campaign_run(session: Session, campaign: str) -> Run | None:
    """The newest run of ``campaign`` in this store, whatever its status (the re-run fast path's base)."""
    return session.scalars(select(Run).where(Run.campaign == campaign).order_by(Run.started_at.desc())
                           .limit(1)).first()


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


def clip_ranks(scores: Iterable[Score]) -> dict[str, int]:
    """Each candidate's rank by CLIP's total score within one decision (1 = best), as a reviewer sees it."""
    return {sc.draft_key: n for n, sc in enumerate(sorted(scores, key=lambda sc: -sc.total), start=1)}


def search_assets(session: Session, *, campaign: str | None = None, deliverable: str | None = None,
                  stage: str | None = None, model: str | None = None, seed: int | None = None,
                  since: datetime | None = None, kept: bool | None = None, rating: tuple[str, int] | None = None,
                  rejected: bool | None = None, limit: int = 200) -> list[Asset]:
    """Assets across runs, newest first, filtered on what the lineage records.

    ``model`` matches a model name anywhere in the asset's model identity (``name``, or a ``pipeline`` /
    ``ip_adapter`` sub-identity); ``seed`` the recorded seed; ``kept`` a draft that some selection kept
    (True) or never kept (False): it implies stage ``draft``. ``rating``: (operator, stars), e.g. (">=", 4),
    on the asset's latest rating (``RATING_OPS``; an asset never rated, or rated with no stars, does not
    match); ``rejected``: its latest rating rejects it (True) or nothing rejects it now (False).
    JSON fields are filtered in Python after the SQL filters (portable across SQLite / PostgreSQL; the SQL
    ones do most of the narrowing).
    """
    q = select(Asset).order_by(Asset.created_at.desc(), Asset.key)
    if campaign is not None:
        q = q.where(Asset.campaign == campaign)
    if deliverable is not None:
        q = q.where(Asset.deliverable == deliverable)
    if kept is not None:
        stage = stage or "draft"
        kept_keys = select(Score.draft_key).where(Score.kept.is_(True))
        q = q.where(Asset.key.in_(kept_keys) if kept else Asset.key.not_in(kept_keys))
    if stage is not None:
        q = q.where(Asset.stage == stage)
    if rating is not None:
        q = q.where(Asset.key.in_(_rated(rating_condition(*rating))))
    if rejected is not None:
        rejects = _rated(Rating.rejected.is_(True))
        q = q.where(Asset.key.in_(rejects) if rejected else Asset.key.not_in(rejects))
    if since is not None:
        q = q.where(Asset.created_at >= since)
    out = []
    for a in session.scalars(q):
        if seed is not None and (a.params or {}).get("seed") != seed:
            continue
        if model is not None and model not in model_names(a.model):
            continue
        out.append(a)
        if len(out) >= limit:
            break
    return out


def model_names(model: dict | None) -> list[str]:
    """Every model name in a model identity: ``{"name"}`` or ``{"pipeline": {...}, "ip_adapter": {...}}``."""
    if not model:
        return []
    if "name" in model:
        return [model["name"]]
    return [n for sub in model.values() if isinstance(sub, dict) for n in model_names(sub)]


def kept_drafts(session: Session, draft_keys: Iterable[str]) -> set[str]:
    """Those of ``draft_keys`` that some selection kept."""
    keys = list(draft_keys)
    if not keys:
        return set()
    return set(session.scalars(select(Score.draft_key).where(Score.draft_key.in_(keys), Score.kept.is_(True))))


# ------------------------------------------------------------------------------ ratings, reviews, gates
def _latest_rating_ids():
    """The id of each asset's latest rating (the one that counts)."""
    return select(func.max(Rating.id)).group_by(Rating.asset_key)


def _rated(condition):  # noqa: ANN001, ANN202 - a SQL expression on Rating
    """Keys of the assets whose latest rating meets ``condition``."""
    return select(Rating.asset_key).where(Rating.id.in_(_latest_rating_ids()), condition)


def rating_condition(op: str, stars: int):  # noqa: ANN201 - a SQL expression
    if op not in RATING_OPS:
        raise ValueError(f"unknown comparison {op!r}; one of {' '.join(RATING_OPS)}")
    col = Rating.stars
    return {">=": col >= stars, "<=": col <= stars, ">": col > stars, "<": col < stars, "=": col == stars}[op]


def latest_ratings(session: Session, keys: Iterable[str]) -> dict[str, Rating]:
    """The latest rating of each of ``keys`` that has one."""
    keys = list(dict.fromkeys(keys))
    out: dict[str, Rating] = {}
    for i in range(0, len(keys), 500):  # SQL parameter limits
        chunk = keys[i:i + 500]
        ids = select(func.max(Rating.id)).where(Rating.asset_key.in_(chunk)).group_by(Rating.asset_key)
        out.update({r.asset_key: r for r in session.scalars(select(Rating).where(Rating.id.in_(ids)))})
    return out


def run_gates(session: Session, run_id: str) -> list[Gate]:
    """The review gates a run reached, by deliverable and round."""
    return list(session.scalars(select(Gate).where(Gate.run_id == run_id).order_by(Gate.deliverable, Gate.round)))


def reviews_by_id(session: Session, ids: Iterable[int]) -> dict[int, Review]:
    ids = [i for i in set(ids) if i is not None]
    if not ids:
        return {}
    return {r.id: r for r in session.scalars(select(Review).where(Review.id.in_(ids)))}


def latest_reviews(session: Session, decisions: Iterable[str]) -> dict[str, Review]:
    """The latest review (the one that counts) of each of ``decisions`` that has one."""
    decisions = [d for d in set(decisions) if d]
    if not decisions:
        return {}
    ids = select(func.max(Review.id)).where(Review.decision.in_(decisions)).group_by(Review.decision)
    return {r.decision: r for r in session.scalars(select(Review).where(Review.id.in_(ids)))}
