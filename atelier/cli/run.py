"""`atelier validate` and `atelier run`."""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import typer

from atelier.cli.common import AssetsOpt, HomeOpt, StoreOpt, _fail, _open, app, err, heavy_imports, out
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

    roles = ("draft_model", "refine_model", "inpaint_model", "ip_adapter", "clip", "face", "upscale")
    specs = [s for s in dict.fromkeys(getattr(prof, r) for r in roles) if s is not None]
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
    ephemeral: bool = typer.Option(False, "--ephemeral", help="use Prefect's temporary server for this run only, "
                                   "not the home's lasting one (also ATELIER_EPHEMERAL=1)"),
) -> None:
    """Run a brief through all five stages as a Prefect flow (stopping at review gates where it asks for them).

    Prefect: the server at PREFECT_API_URL when it is set, else the home's own server (`atelier server`),
    started on first use and left running for the next runs and its UI."""
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
    if force is None and not review and _fast_rerun(campaign, run_id, profile or campaign.brief.profile, home,
                                                    store_url, assets_url, task_runner, report, ephemeral):
        return
    execute(brief, campaign, run_id, profile or campaign.brief.profile, home, store_url, assets_url, force=force,
            review=review, task_runner=task_runner, workers=workers, report=report, ephemeral=ephemeral)


def _fast_rerun(campaign: Any, run_id: str, profile: str, home: Optional[Path], store_url: Optional[str],
                assets_url: Optional[str], task_runner: str, report: bool, ephemeral: bool) -> bool:
    """An unchanged re-run without Prefect (``atelier.fastpath``): when the newest run of the campaign is still
    all in place, record ``run_id`` as reusing it, show it in the Prefect UI, report; True when done so.
    False, having written nothing, whenever the flow should run instead: with ``--ephemeral``, with no Prefect
    server to record the run in (the normal path starts the home's), anything changed or gone, or
    ``ATELIER_FAST_RERUN=0`` (always the flow)."""
    from atelier import fastpath
    from atelier import server as srv

    # 1. Where Prefect would record the run: a configured API, else the home's running server
    if ephemeral or os.environ.get("ATELIER_EPHEMERAL") == "1" or os.environ.get("ATELIER_FAST_RERUN") == "0":
        return False
    t0, started_at = time.perf_counter(), datetime.now(UTC).replace(tzinfo=None)
    h = home_dir(home)
    prepare_environment(h, offline_models=True)
    if not store_url and not (h / "lineage.db").exists():
        return False
    api_url, server = srv.configured_api_url(), None
    if not api_url:
        server = srv.status(h)
        if server is None:
            return False
        api_url = server.api_url
    # 2. The store, and the newest run of the campaign as it was recorded
    from atelier.errors import StoreError
    from atelier.profiles import PROFILES
    from store import open_store
    from store.db import default_url

    try:
        st = open_store(h, store_url or default_url(h), assets_url)
    except StoreError:
        return False  # the normal path says what is wrong
    prof = PROFILES[profile]
    if any(spec.kind != "open-clip" and not ok for spec, ok in _availability(prof, h / "models")):
        return False  # the normal path names what is missing
    try:
        decision = fastpath.check(st, campaign, fastpath.fingerprint(campaign, profile, None, False, st, h))
    except Exception:  # noqa: BLE001 - e.g. a record written by another atelier version: the flow decides
        return False
    if decision.previous is None:
        return False
    # 3. The new run, reusing it; the Prefect UI; the usual end
    out.print(f"atelier run [bold]{run_id}[/]: {campaign.brief.campaign} on profile [bold]{prof.name}[/]"
              + (" [yellow](random-weight test models)[/]" if prof.random_weights
                 else f" ({prof.models_note})" if prof.models_note else "") + f", home {h}")
    out.print(f"[dim]Prefect: {server.ui_url} (this home's server)" if server else f"[dim]Prefect: {api_url}",
              highlight=False)
    sheet = fastpath.record(st, run_id, decision.previous, campaign, task_runner, started_at)
    problem = fastpath.register(api_url, {
        "brief_path": str(campaign.path), "home": str(h), "run_id": run_id, "profile": prof.name,
        "store_url": store_url, "assets_url": assets_url, "force": None, "submit": task_runner == "dask",
        "progress": "rich", "review": False, "resume": False}, campaign.brief.campaign, decision.previous, sheet)
    if problem:
        out.print(f"[dim]Prefect: this run is not in the UI ({problem}); it is recorded in the store",
                  highlight=False, soft_wrap=True)
    out.print(f"run {run_id} completed in {time.perf_counter() - t0:.1f}s [dim](unchanged since run "
              f"{decision.previous}: everything reused, no flow ran)", highlight=False)
    if report:
        from atelier.cli.inspect import _show_report

        _show_report(h, store_url, run_id, as_json=False)
    _exit_if_blocked(st, run_id)
    return True


def _availability(prof: Any, models_dir: Path) -> list[tuple[Any, bool]]:
    """Each model of the profile and whether its weights are here (as ``_missing_models`` checks them)."""
    from atelier.sources import available

    roles = ("draft_model", "refine_model", "inpaint_model", "ip_adapter", "clip", "face", "upscale")
    specs = [s for s in dict.fromkeys(getattr(prof, r) for r in roles) if s is not None]
    return [(spec, spec.kind == "open-clip" or available(spec, models_dir)[0]) for spec in specs]


def _prefect_server(h: Path, home_opt: Optional[Path], ephemeral: bool) -> tuple[AbstractContextManager, Any]:
    """Point Prefect at the home's lasting server, started when none runs (said once, with how to stop it).

    PREFECT_API_URL (or Prefect settings already in force in this process) is used as it is; ``--ephemeral``
    (or ATELIER_EPHEMERAL=1) leaves Prefect to start its temporary server for this run only. Returns the
    context to run the flow in, and the home's server (None when it is not used)."""
    from atelier import server as srv

    configured = srv.configured_api_url()
    if configured:
        out.print(f"[dim]Prefect: {configured}", highlight=False)
        return nullcontext(), None
    if ephemeral or os.environ.get("ATELIER_EPHEMERAL") == "1":
        out.print("[dim]starting Prefect's temporary server (--ephemeral)…")
        return nullcontext(), None
    try:
        server, started = srv.ensure(h)
    except srv.ServerError as exc:
        err.print(f"[bold red]error:[/] this home's Prefect server: {exc}; or run with --ephemeral", highlight=False)
        raise typer.Exit(1) from None
    if started:
        out.print(f"started this home's Prefect server, UI {server.ui_url}: it stays up for the next runs; stop it "
                  f"with `atelier server stop{f' --home {home_opt}' if home_opt else ''}`", highlight=False,
                  soft_wrap=True)
    else:
        out.print(f"[dim]Prefect: {server.ui_url} (this home's server)", highlight=False)
    if "prefect.context" not in sys.modules:
        os.environ["PREFECT_API_URL"] = server.api_url  # read when prefect is imported (Dask workers inherit it)
        return nullcontext(), server
    from prefect.settings import PREFECT_API_URL, temporary_settings  # imported already: settings are frozen

    return temporary_settings({PREFECT_API_URL: server.api_url}), server


class _ServerLoss:
    """Ends a run in one line when the home's Prefect server dies under it (``kill -9``, the OOM killer).

    Left alone, Prefect's client retries each call for about a minute and logs a traceback for each, and the
    run ends minutes later. Instead, once the server's process is gone: logging is silenced, the flow is
    stopped as by SIGTERM (at a safe point: a store write in progress completes first, and the flow records
    the run's end), then the run is marked failed and the process exits 1 with one line. The next run starts
    a new server."""

    def __init__(self, server: Any, st: Any, run_id: str) -> None:
        import threading

        from atelier import server as srv

        self.server, self.st, self.run_id = server, st, run_id
        self.lost = threading.Event()
        self._once = threading.Lock()
        self.stop = srv.watch(server, self._on_exit)

    def happened(self) -> bool:
        from atelier import server as srv

        return self.lost.is_set() or not srv.alive(self.server)

    def _on_exit(self) -> None:  # the watch thread
        import _thread
        import logging
        import signal

        self.lost.set()
        logging.disable(logging.CRITICAL)  # Prefect's engine, client and event workers: a traceback per call
        _thread.interrupt_main(signal.SIGTERM)
        deadline = time.monotonic() + 60  # a model call is interrupted at its next Python line
        while time.monotonic() < deadline and self._status() == "running":
            time.sleep(0.2)
        self.end()  # the flow recorded the run: Prefect's own clean-up would only retry the dead server

    def _status(self) -> Optional[str]:
        from atelier.review import run_row

        try:
            return run_row(self.st, self.run_id).status
        except Exception:  # noqa: BLE001 - not recorded yet (the flow had not started it)
            return None

    def end(self) -> None:
        """Mark the run failed, say so in one line, exit 1 (either thread; once)."""
        import logging

        from store import lineage

        self._once.acquire()  # a second caller waits for the exit
        logging.disable(logging.CRITICAL)
        reason = f"the Prefect server (pid {self.server.pid}, {self.server.ui_url}) stopped during the run"
        try:
            if self._status() is not None:
                lineage.finish_run(self.st, self.run_id, error=reason)
        finally:
            err.print(f"[bold red]run {self.run_id} failed:[/] {reason}; what it stored is kept: run it again (a new "
                      f"server starts) or `atelier resume {self.run_id}`", highlight=False, soft_wrap=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # Prefect's threads would keep retrying the dead server


def execute(brief: Path, campaign: Any, run_id: str, profile: str, home: Optional[Path], store_url: Optional[str],
            assets_url: Optional[str], force: Optional[str] = None, review: bool = False, resume: bool = False,
            task_runner: str = "sequential", workers: int = 2, report: bool = True, ephemeral: bool = False) -> None:
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
    prefect_api, server = _prefect_server(h, home, ephemeral)  # before prefect is imported: settings freeze then
    loss = _ServerLoss(server, st, run_id) if server is not None else None
    from atelier import interrupts

    with heavy_imports():
        from flows.campaign import campaign_flow_for, terminal_logs_without_tracebacks

    terminal_logs_without_tracebacks()
    try:
        with interrupts.terminate_as_interrupt(), prefect_api:
            campaign_flow_for(task_runner, workers)(
                brief_path=str(brief), home=str(h), run_id=run_id, profile=prof.name, store_url=store_url,
                assets_url=assets_url, force=force, submit=task_runner == "dask",
                progress="rich", review=review, resume=resume)
    except BriefError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded in the store; show one line and fail
        if loss is not None and loss.happened():
            loss.end()
        err.print(f"[bold red]run {run_id} failed:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except BaseException as exc:  # Ctrl-C, SIGTERM
        if loss is not None and loss.happened():
            loss.end()
        if interrupts.signal_of(exc) is None:
            raise
        _cancelled(st, run_id, interrupts.signal_of(exc), time.perf_counter() - t0)
    if loss is not None:
        loss.stop()
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
    if not resume:
        _remember(st, run_id, campaign, profile, force, review, h)
    out.print(f"run {run_id} completed in {seconds:.1f}s")
    if report:
        from atelier.cli.inspect import _show_report

        _show_report(h, store_url, run_id, as_json=False)
    _exit_if_blocked(st, run_id)


def _remember(st: Any, run_id: str, campaign: Any, profile: str, force: Optional[str], review: bool, h: Path) -> None:
    """The completed run's fingerprint, for the next unchanged re-run (``atelier.fastpath``). Never fails the run:
    a problem is one dim line, and the next re-run runs the flow."""
    from atelier import fastpath

    try:
        fastpath.remember(st, run_id, campaign, profile, force, review, h)
    except Exception as exc:  # noqa: BLE001 - only the next re-run's speed depends on it
        out.print(f"[dim]not recorded for a fast re-run: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)


SAFETY_EXIT = 3  # the run completed, but the safety gate kept finals from delivery


def _exit_if_blocked(st: Any, run_id: str) -> None:
    """Name each final the safety gate blocked (not exported), and why; then exit ``SAFETY_EXIT``."""
    from atelier.review import run_row
    from store import lineage

    blocked = lineage.safety_blocked(run_row(st, run_id))
    if not blocked:
        return
    for b in blocked:
        err.print(f"[bold red]blocked[/] {b['deliverable']}: final {b['key']} not exported: open_nsfw score "
                  f"{b['nsfw']:.4f} >= threshold {b['threshold']} (safety: {b['mode']})", highlight=False, soft_wrap=True)
    raise typer.Exit(SAFETY_EXIT)


def _cancelled(st: Any, run_id: str, signum: int, seconds: float) -> None:
    """The one line of an interrupted run; exit 128 + the signal's number, as a shell reports it."""
    import signal

    from store import lineage

    name = signal.Signals(signum).name
    lineage.cancel_run(st, run_id, f"interrupted by {name}")  # where the signal came before the flow could
    err.print(f"[bold yellow]run {run_id} cancelled[/] ({name}) after {seconds:.1f}s; what it stored is kept, "
              f"continue it with: atelier resume {run_id}", highlight=False, soft_wrap=True)
    import gc

    gc.freeze()  # the interpreter's last collection walks every object of torch and Prefect (seconds): skip it
    raise typer.Exit(128 + signum)


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="the run to continue (one that awaits review, failed, or was killed)"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    assets_url: Optional[str] = AssetsOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="print the run report at the end"),
    ephemeral: bool = typer.Option(False, "--ephemeral", help="use Prefect's temporary server for this run only "
                                   "(as `atelier run --ephemeral`)"),
) -> None:
    """Continue a run from its review gates (or after a failure or a kill): what is stored is reused, and a
    decision changed since (`atelier review RUN --round N`) recomputes only what follows the changed picks."""
    resume_run(run_id, home, store_url, assets_url, report, ephemeral=ephemeral)


def resume_run(run_id: str, home: Optional[Path], store_url: Optional[str], assets_url: Optional[str],
               report: bool = True, ephemeral: bool = False) -> None:
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
            review=bool((r.info or {}).get("review")), resume=True, report=report, ephemeral=ephemeral)
