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
    rounds = sum(len(b.rounds_of(d)) for d in b.deliverables)
    finals = sum((b.rounds_of(d)[-1].keep if b.rounds_of(d) else d.keep) for d in b.deliverables)
    gated = [d.name for d in b.deliverables if b.review_of(d)]
    out.print(f"[green]ok[/] {brief}: campaign {b.campaign}, profile {b.profile}, {len(campaign.style_refs)} "
              f"reference image(s), {len(b.deliverables)} deliverable(s), "
              f"{sum(d.drafts for d in b.deliverables)} drafts"
              + (f", {rounds} variation round(s)" if rounds else "") + f" → {finals} finals"
              + (f"; a person decides for {', '.join(gated)}" if gated else ""))


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
                                             "draft, vary, select, refine, inpaint, face_restore, upscale"),
    review: bool = typer.Option(False, "--review", help="stop after every selection for a person's decision "
                                                        "(as `review: true` in the brief)"),
    task_runner: str = typer.Option("sequential", "--task-runner",
                                    help="sequential (one process) or dask (a local Dask cluster, prefect-dask)"),
    workers: int = typer.Option(2, "--workers", min=1, help="Dask worker processes (with --task-runner dask)"),
) -> None:
    """Run a brief through all five stages as a Prefect flow (stopping at review gates where it asks for them)."""
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
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    execute(brief, campaign, run_id, profile or campaign.brief.profile, home, store_url, assets_url, force=force,
            review=review, task_runner=task_runner, workers=workers, report=report)


def execute(brief: Path, campaign: Any, run_id: str, profile: str, home: Optional[Path], store_url: Optional[str],
            assets_url: Optional[str], force: Optional[str] = None, review: bool = False, resume: bool = False,
            task_runner: str = "sequential", workers: int = 2, report: bool = True) -> None:
    """Run (or resume) ``run_id`` of a validated brief through the campaign flow, then say how it ended."""
    from atelier.profiles import PROFILES

    h = home_dir(home)
    prof = PROFILES[profile]
    prepare_environment(h, offline_models=True)
    missing = _missing_models(prof, h / "models")
    if missing:
        _fail(f"profile {prof.name!r} cannot run here: " + "; ".join(missing) + " (see `atelier models`)")
    from store.db import default_url

    st = _open(h, store_url or default_url(h), assets_url)  # reachable and migrated, or exit 2 before Prefect starts
    out.print(f"atelier {'resume' if resume else 'run'} [bold]{run_id}[/]: {campaign.brief.campaign} on profile "
              f"[bold]{prof.name}[/]" + (" [yellow](random-weight test models)[/]" if prof.random_weights
                                         else f" ({prof.models_note})" if prof.models_note else "") + f", home {h}")

    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # prefect won't create it
    t0 = time.perf_counter()
    out.print("[dim]starting Prefect (embedded server unless PREFECT_API_URL is set)…")
    from flows.campaign import campaign_flow_for

    try:
        campaign_flow_for(task_runner, workers)(
            brief_path=str(brief), home=str(h), run_id=run_id, profile=prof.name, store_url=store_url,
            assets_url=assets_url, force=force, submit=task_runner == "dask",
            progress="rich", review=review, resume=resume)
    except BriefError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded in the store; show one line and fail
        err.print(f"[bold red]run {run_id} failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    from atelier.review import open_gates

    gates = open_gates(st, run_id)
    seconds = time.perf_counter() - t0
    if gates:
        out.print(f"run {run_id} [bold yellow]awaits review[/] after {seconds:.1f}s:")
        for g in gates:
            out.print(f"  {g.deliverable} · round {g.round}: {len(g.candidates)} candidates; CLIP suggests "
                      f"{','.join(map(str, g.suggestion))}", highlight=False, soft_wrap=True)
        out.print(f"see them: atelier review {run_id}   (or a page to click: atelier review {run_id} --serve)\n"
                  f"decide:   atelier review {run_id} --deliverable NAME --keep 3,5 --resume\n"
                  f"later:    atelier resume {run_id}", highlight=False, soft_wrap=True)
        return
    out.print(f"run {run_id} completed in {seconds:.1f}s")
    if report:
        from atelier.cli.inspect import _show_report

        _show_report(h, store_url, run_id, as_json=False)


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="the run to continue (one that awaits review, failed, or was killed)"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    assets_url: Optional[str] = AssetsOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="print the run report at the end"),
) -> None:
    """Continue a run from its review gates (or after a failure or a kill): what is stored is reused, and a
    decision changed since (`atelier review RUN --round N`) recomputes only what follows the changed picks."""
    resume_run(run_id, home, store_url, assets_url, report)


def resume_run(run_id: str, home: Optional[Path], store_url: Optional[str], assets_url: Optional[str],
               report: bool = True) -> None:
    from atelier.brief import load_brief
    from atelier.errors import UsageError
    from atelier.review import run_row
    from store.db import default_url

    h = home_dir(home)
    st = _open(h, store_url or default_url(h), assets_url)
    try:
        r = run_row(st, run_id)
    except UsageError as exc:
        _fail(str(exc))
    if r.status == "running":
        from store import lineage
        from store.doctor import _alive

        if _alive(r.info or {}) is not False:
            _fail(f"run {run_id} is running (pid {(r.info or {}).get('pid')} on {(r.info or {}).get('host')})")
        with st.sessions.begin() as s:  # its process died (killed, crashed): resume it
            lineage.mark_dead_run(s, run_id, "process gone; resumed")
    brief = Path(r.brief_path)
    try:
        campaign = load_brief(brief)
    except BriefError as exc:
        _fail(str(exc))
    if campaign.sha256 != r.brief_sha256:
        _fail(f"{brief}: changed since run {run_id} started; run it anew with `atelier run {brief}` "
              "(everything unchanged is reused, and so are decisions already given)")
    execute(brief, campaign, run_id, r.profile, home, store_url, assets_url, force=None,  # forced in its first pass
            review=bool((r.info or {}).get("review")), resume=True, report=report)
