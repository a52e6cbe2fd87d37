"""Scheduled batch production: each tick runs every brief in a folder that is new or changed.

"Changed" means: no completed run of this brief file with this content (sha256) and profile exists
in the store. A bad brief is reported and skipped; it does not stop the others.

A run that stopped at a review gate is not started again while it awaits review; once a person has decided
every gate it waits at (``atelier review``), the next tick resumes it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from sqlalchemy import select

from atelier.brief import load_brief
from atelier.errors import BriefError
from flows.campaign import campaign_flow
from store import lineage, open_store
from store.schema import Run


def briefs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def needs_run(home: Path, store_url: str | None, brief: Path, sha256: str, profile: str) -> bool:
    st = open_store(home, store_url)
    with st.sessions() as s:
        done = s.scalars(select(Run.id).where(Run.brief_path == str(brief.resolve()), Run.brief_sha256 == sha256,
                                              Run.profile == profile,
                                              Run.status.in_(("completed", lineage.AWAITING))).limit(1)).first()
    return done is None


def reviewed_runs(home: Path, store_url: str | None, folder: Path) -> list[Run]:
    """Runs of briefs in ``folder`` that stopped at review gates which have all been decided since."""
    st = open_store(home, store_url)
    folder = folder.resolve()
    with st.sessions() as s:
        waiting = s.scalars(select(Run).where(Run.status == lineage.AWAITING).order_by(Run.started_at))
        return [r for r in waiting if Path(r.brief_path).parent == folder and not lineage.pending_gates(s, r.id)]


@flow(name="scheduled-batch", log_prints=False)
def batch_flow(folder: str, home: str, store_url: str | None = None) -> dict:
    """Run the briefs of ``folder`` that are new or changed since their last successful run."""
    log = get_run_logger()
    summary: dict[str, list[str]] = {"ran": [], "unchanged": [], "invalid": [], "resumed": []}
    for run in reviewed_runs(Path(home), store_url, Path(folder)):
        try:
            campaign = load_brief(run.brief_path)
        except BriefError as exc:
            log.error("%s", exc)
            continue
        if campaign.sha256 != run.brief_sha256:
            continue  # changed since: the loop below runs the new version
        campaign_flow(brief_path=run.brief_path, home=home, run_id=run.id, profile=run.profile, store_url=store_url,
                      review=bool((run.info or {}).get("review")), resume=True)
        summary["resumed"].append(run.id)
    for brief in briefs_in(Path(folder)):
        try:
            campaign = load_brief(brief)
        except BriefError as exc:
            log.error("%s", exc)
            summary["invalid"].append(str(brief))
            continue
        profile = campaign.brief.profile
        if not needs_run(Path(home), store_url, brief, campaign.sha256, profile):
            summary["unchanged"].append(str(brief))
            continue
        run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        campaign_flow(brief_path=str(brief), home=home, run_id=run_id, profile=profile, store_url=store_url)
        summary["ran"].append(str(brief))
    log.info("batch: %d resumed after review, %d ran, %d unchanged, %d invalid", len(summary["resumed"]),
             len(summary["ran"]), len(summary["unchanged"]), len(summary["invalid"]))
    return summary
