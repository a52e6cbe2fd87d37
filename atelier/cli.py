"""The ``atelier`` command line: thin Typer commands over brief, flow, store and report modules.

Every user error (bad brief, unknown run, unknown profile) ends as one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from atelier.errors import BriefError, UsageError
from atelier.settings import home_dir, prepare_environment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="atelier: YAML briefs in, finished images with lineage out.")
out = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="atelier home (store, assets, models); default $ATELIER_HOME or ./.atelier")
StoreOpt = typer.Option(None, "--store", help="SQLAlchemy URL of the lineage store; default sqlite in the home")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _open(home: Optional[Path], store_url: Optional[str]):
    from store import open_store

    h = home_dir(home)
    if not store_url and not (h / "lineage.db").exists():
        _fail(f"no lineage store at {h / 'lineage.db'} (run a brief first, or pass --home)")
    return open_store(h, store_url)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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


class _RichReporter:
    """Rich progress: one bar per (deliverable, stage)."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def begin(self, label: str, total: int):
        tid = self.progress.add_task(label, total=max(total, 1))
        self.tasks[label] = tid
        return lambda done, total: self.progress.update(tid, completed=done, total=max(total, 1))

    def end(self, label: str, summary: str) -> None:
        tid = self.tasks.pop(label, None)
        if tid is not None:
            self.progress.update(tid, completed=self.progress.tasks[tid].total, description=f"{label} [dim]({summary})")


@app.command()
def run(
    brief: Path = typer.Argument(..., help="the YAML brief"),
    profile: Optional[str] = typer.Option(None, "--profile", help="override the brief's model profile"),
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="print the run report at the end"),
) -> None:
    """Run a brief through all five stages as a Prefect flow."""
    from atelier.brief import load_brief
    from atelier.registry import PROFILES

    try:
        campaign = load_brief(brief)
    except BriefError as exc:
        _fail(str(exc))
    if profile is not None and profile not in PROFILES:
        _fail(f"--profile: unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    h = home_dir(home)
    prof = PROFILES[profile or campaign.brief.profile]
    prepare_environment(h, offline_models=True)
    run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    out.print(f"atelier run [bold]{run_id}[/]: {campaign.brief.campaign} on profile [bold]{prof.name}[/]"
              + (" [yellow](random-weight test models)[/]" if prof.random_weights else "") + f", home {h}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from atelier import progress as progress_mod

    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out, transient=False) as bar:
        with progress_mod.reporting(_RichReporter(bar)):
            bar.console.print("[dim]starting Prefect (embedded server unless PREFECT_API_URL is set)…")
            from flows.campaign import campaign_flow

            try:
                campaign_flow(brief_path=str(brief), home=str(h), run_id=run_id, profile=prof.name, store_url=store_url)
            except BriefError as exc:
                _fail(str(exc))
            except Exception as exc:  # noqa: BLE001 - recorded in the store; show one line and fail
                err.print(f"[bold red]run {run_id} failed:[/] {type(exc).__name__}: {exc}")
                raise typer.Exit(1)
    out.print(f"run {run_id} completed in {time.perf_counter() - t0:.1f}s")
    if report:
        _show_report(h, store_url, run_id, as_json=False)


@app.command()
def runs(home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List runs, newest first."""
    from atelier.report import run_dict
    from store import queries

    st = _open(home, store_url)
    with st.sessions() as s:
        rows = [run_dict(r) for r in queries.runs(s)]
    if as_json:
        return _print_json(rows)
    table = Table("run", "campaign", "profile", "status", "started (UTC)", "seconds")
    for r in rows:
        table.add_row(r["id"], r["campaign"], r["profile"], r["status"], r["started_at"],
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    out.print(table)


def _show_report(home, store_url, run_id: Optional[str], as_json: bool) -> None:
    from atelier.report import run_report
    from store import queries
    from store.schema import Run

    st = _open(home, store_url)
    with st.sessions() as s:
        run_row = s.get(Run, run_id) if run_id else queries.latest_run(s)
        if run_row is None:
            _fail(f"no run {run_id!r} in {st.url} (see `atelier runs`)" if run_id else "no runs yet")
        data = run_report(s, run_row)
    if as_json:
        return _print_json(data)
    r = data["run"]
    note = " [yellow]— random-weight test models: images are noise, the pipeline is real[/]" if r["random_weights"] else ""
    tree = Tree(f"[bold]run {r['id']}[/] · {r['campaign']} · profile {r['profile']} · {r['status']}{note}")
    for name, d in data["deliverables"].items():
        times = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in d["stages"].items())
        node = tree.add(f"[bold]{name}[/]  [dim]{times}[/]")
        drafts = node.add(f"drafts ({len(d.get('draft', []))})")
        for x in d.get("draft", []):
            mark = f"[green]✓ kept #{x['rank']}[/]" if x.get("kept") else ""
            score = (f"prompt {x['prompt_score']:+.3f} · mood {x['moodboard_score']:+.3f} · total {x['total']:+.3f}"
                     if "total" in x else "")
            drafts.add(f"{x['key'][:10]} seed {x['seed']} {x['width']}x{x['height']}  {score} {mark}")
        for stage in ("refine", "inpaint", "face_restore", "upscale"):
            if stage in d:
                sub = node.add(f"{stage} ({len(d[stage])})")
                for x in d[stage]:
                    extra = f" faces {len(x['faces'])}" if stage == "face_restore" else ""
                    final = f" → [cyan]{x['final']}[/]" if x.get("final") else ""
                    sub.add(f"{x['key'][:10]} {x['width']}x{x['height']}{extra}{final}")
    out.print(tree)
    table = Table("stage", "assets", "computed", "reused", "seconds", title="per stage")
    for stage, v in data["stages"].items():
        table.add_row(stage, str(v["assets"]), str(v["computed"]), str(v["reused"]), f"{v['seconds']:.2f}")
    out.print(table)


@app.command()
def report(run_id: Optional[str] = typer.Argument(None, help="run id; default the latest run"),
           home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Per deliverable: drafts → scores → kept → refined → post-edit outputs, with times per stage."""
    _show_report(home, store_url, run_id, as_json)


@app.command()
def lineage(ref: str = typer.Argument(..., help="asset key (or a unique prefix) or an image file atelier made"),
            home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Where did this file come from: the ancestry chain down to prompt, seed, draft and references."""
    from atelier.report import SHOWN, lineage_dict
    from store import queries

    st = _open(home, store_url)
    with st.sessions() as s:
        asset = queries.find_asset(s, ref)
        if asset is None:
            _fail(f"{ref}: no asset with this key, key prefix or file content in {st.url}")
        data = lineage_dict(queries.ancestry(s, asset.key))
    if as_json:
        return _print_json(data)

    def add(parent: Tree | None, node: dict) -> Tree:
        params = node["params"]
        shown = ", ".join(f"{k}={params[k]!r}" for k in SHOWN.get(node["stage"], []) if k in params)
        model = (node.get("model") or {})
        model_name = model.get("name") or (model.get("pipeline") or {}).get("name")
        label = (f"[bold]{node['stage']}[/] {node['key'][:12]}" + (f" [dim]({node['role']})[/]" if node["role"] else "")
                 + (f" {node['width']}x{node['height']}" if node["width"] else "") + (f" · {shown}" if shown else "")
                 + (f" · model {model_name}" if model_name else ""))
        t = Tree(label) if parent is None else parent.add(label)
        for p in node["parents"]:
            add(t, p)
        return t

    out.print(add(None, data))


def main() -> None:
    try:
        app()
    except (BriefError, UsageError) as exc:
        err.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
