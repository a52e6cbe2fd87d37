"""Scheduled batch production: each tick runs every brief in a folder that is new or changed.

"Changed" means: no completed run of this brief file with this content (sha256) and profile exists
in the store. A bad brief is reported and skipped; it does not stop the others.
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
from store import open_store
from store.schema import Run


def briefs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def needs_run(home: Path, store_url: str | None, brief: Path, sha256: str, profile: str) -> bool:
    st = open_store(home, store_url)
    with st.sessions() as s:
        done = s.scalars(select(Run.id).where(Run.brief_path == str(brief.resolve()), Run.brief_sha256 == sha256,
                                              Run.profile == profile, Run.status == "completed").limit(1)).first()
    return done is None


@flow(name="scheduled-batch", log_prints=False)
def batch_flow(folder: str, home: str, store_url: str | None = None) -> dict:
    """Run the briefs of ``folder`` that are new or changed since their last successful run."""
    log = get_run_logger()
    summary: dict[str, list[str]] = {"ran": [], "unchanged": [], "invalid": []}
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
    log.info("batch: %d ran, %d unchanged, %d invalid", len(summary["ran"]), len(summary["unchanged"]),
             len(summary["invalid"]))
    return summary
