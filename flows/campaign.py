"""The campaign flow: mood board once, then per deliverable drafts → selection → refine → post-edit."""

from __future__ import annotations

import platform
import traceback
from pathlib import Path

from prefect import flow, get_run_logger

from atelier import __version__
from atelier.brief import Campaign, load_brief
from flows.tasks import (BoardRefs, RunContext, draft_task, export_task, face_task, inpaint_task, moodboard_task,
                         refine_task, select_task, upscale_task)
from flows.artifacts import publish_deliverable
from atelier.registry import device_used
from store import lineage, open_store


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"atelier": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "open-clip-torch", "realesrgan", "gfpgan", "prefect"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@flow(name="deliverable", log_prints=False, validate_parameters=False)
def deliverable_flow(ctx: RunContext, campaign: Campaign, name: str, board: BoardRefs) -> list[str]:
    """One deliverable's chain; returns the exported final paths."""
    d = next(x for x in campaign.brief.deliverables if x.name == name)
    drafts = draft_task(ctx, campaign, name)
    current = select_task(ctx, campaign, name, drafts, board)
    current = refine_task(ctx, campaign, name, current, board)
    if d.post.inpaint is not None:
        current = inpaint_task(ctx, campaign, name, current, board)
    if d.post.face_restore:
        current = face_task(ctx, campaign, name, current)
    if d.post.upscale:
        current = upscale_task(ctx, campaign, name, current)
    finals = export_task(ctx, campaign, name, current)
    publish_deliverable(ctx.home, ctx.store_url, ctx.run_id, campaign.brief.campaign, name)
    return finals


@flow(name="campaign", log_prints=False, validate_parameters=False)
def campaign_flow(brief_path: str, home: str, run_id: str, profile: str | None = None,
                  store_url: str | None = None, assets_url: str | None = None) -> str:
    """Run a brief end to end; returns the run id. Lineage goes to the store under ``home`` (or ``store_url``),
    asset files to ``<home>/assets`` (or the fsspec URL ``assets_url``)."""
    campaign: Campaign = load_brief(brief_path)
    profile = profile or campaign.brief.profile
    ctx = RunContext(run_id=run_id, home=str(Path(home).resolve()), store_url=store_url, profile=profile,
                     stages=campaign.brief.stages, brief_root=str(campaign.root), assets_url=assets_url)
    store = open_store(Path(ctx.home), store_url, assets_url)
    lineage.start_run(store, run_id, campaign.brief.campaign, str(campaign.path), campaign.sha256, profile,
                      {"versions": _versions()})
    try:
        board = moodboard_task(ctx, campaign)
        for d in campaign.brief.deliverables:
            deliverable_flow.with_options(flow_run_name=f"{campaign.brief.campaign}/{d.name}")(ctx, campaign, d.name, board)
    except BaseException as exc:
        lineage.finish_run(store, run_id, error="".join(traceback.format_exception_only(type(exc), exc)).strip(),
                           device=device_used())
        raise
    lineage.finish_run(store, run_id, device=device_used())
    get_run_logger().info("run %s completed", run_id)
    return run_id
