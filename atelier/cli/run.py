"""`atelier validate` and `atelier run`."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import typer

from atelier.cli.common import AssetsOpt, HomeOpt, StoreOpt, _fail, _open, app, err, out
from atelier.errors import BriefError
from atelier.settings import home_dir, prepare_environment


@app.command()
def validate(brief: Path = typer.Argument(..., help="the YAML brief")) -> None:
    """Check a brief (keys, types, files, sizes) without running anything."""
    from atelier.brief import load_brief

    try:
        campaign = load_brief(brief)
    except BriefError as exc:
        _fail(str(exc))
    b = campaign.brief
    out.print(f"[green]ok[/] {brief}: campaign {b.campaign}, profile {b.profile}, {len(campaign.style_refs)} "
              f"reference image(s), {len(b.deliverables)} deliverable(s), "
              f"{sum(d.drafts for d in b.deliverables)} drafts → {sum(d.keep for d in b.deliverables)} finals")


def _missing_models(prof: Any, models_dir: Path) -> list[str]:
    """One line per model of the profile whose weights are not on this machine (checked in ~ms, offline)."""
    from atelier.sources import available

    roles = ("draft_model", "refine_model", "ip_adapter", "clip", "face", "upscale")
    specs = list(dict.fromkeys(getattr(prof, r) for r in roles))
    problems = []
    # open_clip needs torch imported (~2 s) to be checked: look at everything else first and fail fast.
    for spec in sorted(specs, key=lambda s: s.kind == "open-clip"):
        if problems and spec.kind == "open-clip":
            break
        ok, where = available(spec, models_dir)
        if not ok:
            problems.append(f"{spec.name} ({spec.source}) is not available locally: {where}")
    return problems


@app.command()
def run(
    brief: Path = typer.Argument(..., help="the YAML brief"),
    profile: Optional[str] = typer.Option(None, "--profile", help="override the brief's model profile"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    assets_url: Optional[str] = AssetsOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="print the run report at the end"),
    force: Optional[str] = typer.Option(None, "--force", metavar="STAGE",
                                        help="recompute STAGE and every later stage even where stored: moodboard, "
                                             "draft, select, refine, inpaint, face_restore, upscale"),
    task_runner: str = typer.Option("sequential", "--task-runner",
                                    help="sequential (one process) or dask (a local Dask cluster, prefect-dask)"),
    workers: int = typer.Option(2, "--workers", min=1, help="Dask worker processes (with --task-runner dask)"),
) -> None:
    """Run a brief through all five stages as a Prefect flow."""
    from atelier.brief import load_brief
    from atelier.profiles import PROFILES

    try:
        campaign = load_brief(brief)
    except BriefError as exc:
        _fail(str(exc))
    if profile is not None and profile not in PROFILES:
        _fail(f"--profile: unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    from flows import STAGES

    force = {"face": "face_restore", "face-restore": "face_restore", "mood-board": "moodboard"}.get(force, force)
    if force is not None and force not in STAGES:
        _fail(f"--force: unknown stage {force!r}; known: {', '.join(STAGES)}")
    if task_runner not in ("sequential", "dask"):
        _fail(f"--task-runner: unknown {task_runner!r}; known: sequential, dask")
    h = home_dir(home)
    prof = PROFILES[profile or campaign.brief.profile]
    prepare_environment(h, offline_models=True)
    missing = _missing_models(prof, h / "models")
    if missing:
        _fail(f"profile {prof.name!r} cannot run here: " + "; ".join(missing) + " (see `atelier models`)")
    from store.db import default_url

    _open(h, store_url or default_url(h), assets_url)  # reachable and migrated, or exit 2 before Prefect starts
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    out.print(f"atelier run [bold]{run_id}[/]: {campaign.brief.campaign} on profile [bold]{prof.name}[/]"
              + (" [yellow](random-weight test models)[/]" if prof.random_weights
                 else f" ({prof.models_note})" if prof.models_note else "") + f", home {h}")

    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # prefect won't create it
    t0 = time.perf_counter()
    out.print("[dim]starting Prefect (embedded server unless PREFECT_API_URL is set)…")
    from flows.campaign import campaign_flow_for

    try:
        campaign_flow_for(task_runner, workers)(
            brief_path=str(brief), home=str(h), run_id=run_id, profile=prof.name, store_url=store_url,
            assets_url=assets_url, force=force, submit=task_runner == "dask",
            progress="rich")
    except BriefError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded in the store; show one line and fail
        err.print(f"[bold red]run {run_id} failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    out.print(f"run {run_id} completed in {time.perf_counter() - t0:.1f}s")
    if report:
        from atelier.cli.inspect import _show_report

        _show_report(h, store_url, run_id, as_json=False)


