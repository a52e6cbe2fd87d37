"""`atelier doctor`: integrity check (and repair) of an atelier home."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from atelier.cli.common import AssetsOpt, HomeOpt, JsonOpt, StoreOpt, _fail, _open, _print_json, app, out
from atelier.settings import home_dir


@app.command()
def doctor(
    home: Optional[Path] = HomeOpt,
    store_url: Optional[str] = StoreOpt,
    assets_url: Optional[str] = AssetsOpt,
    repair: bool = typer.Option(False, "--repair", help="fix what can be fixed, then check again"),
    stale_minutes: float = typer.Option(5.0, "--stale-minutes", help="temp files older than this are abandoned"),
    as_json: bool = JsonOpt,
) -> None:
    """Check rows against files and hashes, references, the database itself (SQLite), and runs whose process died.

    Exit code 0: healthy; 1: problems found (and, with --repair, not all of them fixed).
    """
    from sqlalchemy.exc import DatabaseError

    from store import doctor as doc

    if stale_minutes < 0:
        _fail(f"--stale-minutes: expected a number >= 0, got {stale_minutes:g}")
    try:
        st = _open(home, store_url, assets_url)
        report = doc.check(st, stale_after=stale_minutes * 60)
    except DatabaseError as exc:  # not even readable: that is the finding
        report = doc.unreadable(home_dir(home), store_url, exc)
        repair = False
    found, repaired = list(report.problems), []
    if repair and report.problems:
        repaired = doc.repair(st, report)
        report = doc.check(st, stale_after=stale_minutes * 60)
    if as_json:
        _print_json({**report.to_dict(), "found": doc.problem_dicts(found), "repaired": repaired})
        raise typer.Exit(0 if report.healthy else 1)
    if c := report.counts:
        out.print(f"[bold]{report.home}[/]: {c['assets']} assets, {c['files']} files, {c['temp_files']} temp files, "
                  f"{c['runs']} runs, {c['edges']} edges, {c['scores']} scores", soft_wrap=True, highlight=False)
    for line in repaired:
        out.print(f"[green]repaired[/] {line}", soft_wrap=True, highlight=False)
    if report.problems or report.notes:
        table = Table("", "kind", "subject", "detail", "--repair")
        for p in report.problems:
            table.add_row("[red]problem[/]", p.kind, p.subject, p.detail, p.fix or "[dim]manual[/]")
        for p in report.notes:
            table.add_row("[dim]note[/]", p.kind, p.subject, p.detail, "")
        out.print(table)
    if report.healthy:
        out.print("[green]healthy[/]")
        raise typer.Exit(0)
    fixable = sum(p.fix is not None for p in report.problems)
    hint = f"; {fixable} fixable with --repair" if fixable and not repair else ""
    if report.kinds() <= doc.CRASH_DEBRIS:
        hint += " (all of it what an interrupted run leaves behind)"
    out.print(f"[red]{len(report.problems)} problem(s)[/]{hint}")
    raise typer.Exit(1)
