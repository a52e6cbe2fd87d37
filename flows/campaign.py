"""The campaign flow: mood board once, then per deliverable drafts → selection → refine → post-edit.

Each deliverable is a chain of tasks (batch granularity) named ``<deliverable>/<stage>`` in the Prefect UI.
By default the chains run one after the other in this process, so each model is loaded once and a
stage's batch has the device to itself. With ``task_runner="dask"`` every task is submitted to a local
Dask cluster (``prefect-dask``; one process per worker, one task at a time each): deliverables run side by
side, each worker loading the models it needs. Tasks exchange keys and paths only, so either way works.

A per-deliverable subflow would group the tasks in the UI but costs each deliverable two more API
round trips and a heartbeat-thread join (~1-2 s; see bench/README.md), which is most of an unchanged re-run.
"""

from __future__ import annotations

import logging
import platform
import signal
import time
import traceback
from pathlib import Path

from prefect import Flow, flow, get_run_logger
from prefect.states import Completed

from atelier import __version__, interrupts
from atelier.brief import Campaign, load_brief
from atelier.models import device_used
from atelier.progress import reporter
from flows import STAGES
from flows.artifacts import publish_deliverable, publish_gates, publish_run
from flows.context import RunContext, RunSpec
from flows.tasks import (
    GPU_TAG,
    GPU_TASKS,
    draft_task,
    export_task,
    face_task,
    inpaint_task,
    moodboard_task,
    refine_task,
    select_task,
    upscale_task,
    vary_task,
)
from store import lineage

TASK_RUNNERS = ("sequential", "dask")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"atelier": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "open-clip-torch", "realesrgan", "gfpgan", "prefect"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def gpu_limit_exists() -> bool:
    """Whether the Prefect server has a concurrency limit on the ``gpu`` tag (one API call per run).
    ``prefect concurrency-limit create gpu 1`` makes one (stored as the concurrency limit named ``tag:gpu``)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(f"tag:{GPU_TAG}")
    except ObjectNotFound:
        return False
    except Exception:  # noqa: BLE001 - unsure: tag, and let Prefect decide per task
        return True
    return True


def _deliverable_chain(ctx: RunContext, campaign: Campaign, name: str, board, submit: bool,  # noqa: ANN001
                       gpu_tag: bool):
    """One deliverable's tasks, in order. ``submit``: futures (the task runner schedules them; a future
    passed as an argument is resolved first), else plain calls. Returns the exported paths (or their future)."""
    def call(t, *args):  # noqa: ANN001, ANN202
        if gpu_tag and t in GPU_TASKS:
            t = t.with_options(tags={GPU_TAG})
        return t.submit(*args) if submit else t(*args)

    d = next(x for x in campaign.brief.deliverables if x.name == name)
    current = call(draft_task, ctx, campaign, name)
    current = call(select_task, ctx, campaign, name, 0, current, board)
    for n in range(1, len(campaign.brief.rounds_of(d)) + 1):
        current = call(vary_task, ctx, campaign, name, n, current)
        current = call(select_task, ctx, campaign, name, n, current, board)
    current = call(refine_task, ctx, campaign, name, current, board)
    if d.post.inpaint is not None:
        current = call(inpaint_task, ctx, campaign, name, current, board)
    if d.post.face_restore:
        current = call(face_task, ctx, campaign, name, current)
    if d.post.upscale:
        current = call(upscale_task, ctx, campaign, name, current)
    return call(export_task, ctx, campaign, name, current)


def _publish(ctx: RunContext, campaign: Campaign, name: str | None) -> None:
    """Prefect artifacts of deliverable ``name``; with None, the run's (its HTML contact sheet)."""
    t0 = time.perf_counter()
    if name is None:
        publish_run(ctx.store, ctx.run_id, campaign.brief.campaign)
    else:
        publish_deliverable(ctx.store, ctx.run_id, campaign.brief.campaign, name)
    ctx.phases["artifacts"] += time.perf_counter() - t0


@flow(name="campaign", log_prints=False, validate_parameters=False)
def campaign_flow(brief_path: str, home: str, run_id: str, profile: str | None = None,
                  store_url: str | None = None, assets_url: str | None = None, force: str | None = None,
                  submit: bool = False, progress: str = "none", review: bool = False, resume: bool = False) -> str:
    """Run a brief end to end; returns the run id. Lineage goes to the store under ``home`` (or ``store_url``),
    asset files to ``<home>/assets`` (or the fsspec URL ``assets_url``).

    ``force``: a stage name; that stage and every later one recompute even where their assets are stored.
    ``submit``: submit the tasks to the flow's task runner (see ``campaign_flow_for``) instead of calling them.
    ``progress``: the progress sink, ``none`` or ``rich`` (bars on the terminal).
    ``review``: a person decides at every selection (``atelier run --review``), whatever the brief says.
    ``resume``: run ``run_id`` again (it stopped at a review gate or failed): what is stored is reused.
    A deliverable whose gate awaits a decision stops there; the run then ends "awaiting review".
    Ctrl-C or SIGTERM ends it "cancelled" (the exception is raised on: the CLI says so in one line).
    The run's model calls and the seconds spent exporting and publishing go into the run's ``info``.
    """
    if force is not None and force not in STAGES:
        raise ValueError(f"force: unknown stage {force!r}; known: {', '.join(STAGES)}")
    campaign: Campaign = load_brief(brief_path)
    spec = RunSpec(run_id=run_id, home=str(Path(home).resolve()), profile=profile or campaign.brief.profile,
                   store_url=store_url, assets_url=assets_url, stages=campaign.brief.stages,
                   brief_root=str(campaign.root), force=force, review=review)
    with reporter(progress) as sink:
        awaiting = _run(RunContext(spec, progress=sink), campaign, submit, resume)
    if awaiting:  # a completed flow run, named so in the Prefect UI; its artifact lists the candidates
        get_run_logger().info("run %s awaits review: %s", run_id, ", ".join(awaiting))
        return Completed(name="AwaitingReview", data=run_id,
                         message=f"awaiting review: {', '.join(awaiting)} (atelier review {run_id})")
    get_run_logger().info("run %s completed", run_id)
    return run_id


def _run(ctx: RunContext, campaign: Campaign, submit: bool, resume: bool) -> list[str]:
    """Run the chains; returns the deliverables that stopped at a review gate."""
    store, run_id, profile = ctx.store, ctx.run_id, ctx.spec.profile
    gpu_tag = gpu_limit_exists()
    lineage.start_run(store, run_id, campaign.brief.campaign, str(campaign.path), campaign.sha256, profile,
                      {"versions": _versions(), "force": ctx.spec.force, "review": ctx.spec.review,
                       "task_runner": "dask" if submit else "sequential", "gpu_tag": gpu_tag}, resume=resume)
    names = [d.name for d in campaign.brief.deliverables]
    board_task = moodboard_task.with_options(tags={GPU_TAG}) if gpu_tag else moodboard_task
    try:
        if submit:
            board = board_task.submit(ctx, campaign)
            finals = {name: _deliverable_chain(ctx, campaign, name, board, True, gpu_tag) for name in names}
            for name in names:
                finals[name].result()  # raises the first failure
                _publish(ctx, campaign, name)
        else:
            board = board_task(ctx, campaign)
            for name in names:
                _deliverable_chain(ctx, campaign, name, board, False, gpu_tag)
                _publish(ctx, campaign, name)
        _publish(ctx, campaign, None)
        t0 = time.perf_counter()
        publish_gates(ctx.store, run_id, campaign.brief.campaign)
        ctx.phases["artifacts"] += time.perf_counter() - t0
    except BaseException as exc:
        signum = interrupts.signal_of(exc)
        if signum is not None:  # Ctrl-C or SIGTERM: stopped, not failed; the store holds what was committed
            lineage.finish_run(store, run_id, cancelled=f"interrupted by {signal.Signals(signum).name}",
                               device=device_used(), info=_counters(ctx))
        else:
            lineage.finish_run(store, run_id, device=device_used(), info=_counters(ctx),
                               error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        raise
    lineage.finish_run(store, run_id, device=device_used(), info=_counters(ctx))
    with store.sessions() as s:
        return sorted({g.deliverable for g in lineage.pending_gates(s, run_id)})


def _counters(ctx: RunContext) -> dict:
    """What this process counted for the run (a Dask run's model calls happen in its workers: see stage rows)."""
    return {"model_calls": ctx.calls.to_dict(), "phases": {k: round(v, 4) for k, v in ctx.phases.items()}}


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, less its traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        plain = logging.makeLogRecord(record.__dict__)  # a copy: the API handler sends the traceback to the UI
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return self.inner.format(plain)


def terminal_logs_without_tracebacks() -> None:
    """Prefect's log lines on the terminal without tracebacks (the Prefect UI keeps them): a failed run ends in
    the CLI's one line, not in 60 lines of Prefect internals. ``PREFECT_LOGGING_LEVEL=DEBUG`` keeps them.
    For the CLI to call once, after prefect is imported (which configures its logging)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if logging.getLogger("prefect").getEffectiveLevel() <= logging.DEBUG:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def campaign_flow_for(task_runner: str = "sequential", workers: int = 2) -> Flow:
    """``campaign_flow`` with its task runner: ``sequential`` (in this process) or ``dask`` (a local Dask
    cluster of ``workers`` processes, started with the run and closed after it). Call it with ``submit=True``
    for dask."""
    if task_runner == "sequential":
        return campaign_flow
    if task_runner != "dask":
        raise ValueError(f"task runner: unknown {task_runner!r}; known: {', '.join(TASK_RUNNERS)}")
    from prefect_dask import DaskTaskRunner

    # Processes, one thread each: a diffusers pipeline is not thread-safe (its scheduler keeps per-call state),
    # and each process loads its own models. No dashboard: nothing listens beyond the cluster's own ports.
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    return campaign_flow.with_options(task_runner=runner)
