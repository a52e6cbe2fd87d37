"""`atelier schedule` and `atelier serve`: cron-driven batch production with Prefect deployments.

``schedule DIR --cron EXPR`` records the schedule in ``<home>/schedules.json`` and, when a Prefect
server is configured (``PREFECT_API_URL``), registers the deployment there too. ``serve`` runs every
recorded schedule on this machine (``prefect.serve``); without ``PREFECT_API_URL`` it uses the home's
lasting Prefect server (``atelier server``, started if none runs), since cron ticks need a lasting server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import typer

from atelier.cli.common import HomeOpt, StoreOpt, _fail, app, out
from atelier.settings import home_dir, prepare_environment


def _schedules_file(home: Path) -> Path:
    return home / "schedules.json"


def _load(home: Path) -> dict:
    f = _schedules_file(home)
    return json.loads(f.read_text()) if f.exists() else {}


def deployment_name(folder: Path) -> str:
    return "batch-" + re.sub(r"[^a-z0-9-]+", "-", folder.resolve().name.lower()).strip("-")


def deployments(home: Path, store_url: Optional[str] = None) -> list:
    from flows.batch import batch_flow

    return [batch_flow.to_deployment(name=name, cron=s["cron"], parameters={
                "folder": s["folder"], "home": str(home), "store_url": s.get("store_url") or store_url},
                description=f"atelier briefs in {s['folder']}", tags=["atelier"])
            for name, s in _load(home).items()]


@app.command()
def schedule(folder: Path = typer.Argument(..., help="folder of YAML briefs"),
             cron: str = typer.Option(..., "--cron", help='cron expression, e.g. "0 2 * * *" (02:00 daily)'),
             home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt) -> None:
    """Run every new or changed brief in FOLDER on a cron schedule (served by `atelier serve`)."""
    from cronsim import CronSim, CronSimError

    if not folder.is_dir():
        _fail(f"{folder}: not a folder of briefs")
    try:
        from datetime import datetime

        CronSim(cron, datetime.now())
    except CronSimError as exc:
        _fail(f"--cron: {cron!r} is not a cron expression ({exc})")
    h = home_dir(home)
    h.mkdir(parents=True, exist_ok=True)
    data = _load(h)
    name = deployment_name(folder)
    data[name] = {"folder": str(folder.resolve()), "cron": cron, "store_url": store_url}
    tmp = _schedules_file(h).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, _schedules_file(h))
    registered = ""
    if os.environ.get("PREFECT_API_URL"):
        prepare_environment(h)
        [dep] = [d for d in deployments(h, store_url) if d.name == name]
        dep.apply()
        registered = f", registered with {os.environ['PREFECT_API_URL']}"
    out.print(f"scheduled [bold]{name}[/]: {folder} at {cron!r}{registered}; run `atelier serve` to execute it")


@app.command()
def serve(home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt) -> None:
    """Run the recorded schedules on this machine until interrupted (Prefect `serve`).

    Against PREFECT_API_URL when it is set, else the home's lasting Prefect server (`atelier server`), started if
    none runs; it stays up after `serve` ends."""
    from atelier import server as srv

    h = home_dir(home)
    if not _load(h):
        _fail(f"no schedules in {_schedules_file(h)} (add one with `atelier schedule DIR --cron ...`)")
    prepare_environment(h)
    api = srv.configured_api_url()
    if api is None:
        try:
            server, _ = srv.ensure(h)
        except srv.ServerError as exc:
            _fail(f"this home's Prefect server: {exc}")
        os.environ["PREFECT_API_URL"] = api = server.api_url
    from prefect import serve as prefect_serve

    deps = deployments(h, store_url)
    out.print(f"serving {', '.join(d.name for d in deps)} against {api}")
    prefect_serve(*deps, print_starting_message=False)
