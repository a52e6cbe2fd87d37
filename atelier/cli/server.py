"""`atelier server start|stop|status`: the home's own Prefect server, which `atelier run` reuses (atelier/server.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from atelier.cli.common import HomeOpt, JsonOpt, _fail, _print_json, app, out
from atelier.settings import home_dir

server_app = typer.Typer(no_args_is_help=True, help="The home's Prefect server (its UI shows every run): "
                                                    "start, stop, status.")
app.add_typer(server_app, name="server")


def _describe(server, home: Path) -> dict:  # noqa: ANN001 - atelier.server.Server, imported lazily
    return {"running": True, "ui_url": server.ui_url, "api_url": server.api_url, "pid": server.pid,
            "prefect_home": server.prefect_home, "started_at": server.started_at, "home": str(home)}


@server_app.command()
def start(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Start the home's Prefect server in the background on 127.0.0.1 (if it is not running yet)."""
    from atelier import server as srv

    h = home_dir(home)
    if not as_json:
        out.print("[dim]starting the home's Prefect server (10-20 s the first time)…")
    try:
        s, started = srv.ensure(h)
    except srv.ServerError as exc:
        _fail(str(exc))
    if as_json:
        return _print_json({**_describe(s, h), "started": started})
    out.print(f"Prefect server {'started' if started else 'already running'}: UI {s.ui_url}  (pid {s.pid}; "
              f"`atelier server stop{_home_arg(home)}` stops it)", highlight=False, soft_wrap=True)


@server_app.command()
def stop(home: Optional[Path] = HomeOpt) -> None:
    """Stop the home's Prefect server."""
    from atelier import server as srv

    h = home_dir(home)
    try:
        s = srv.stop(h)
    except srv.ServerError as exc:
        _fail(str(exc))
    out.print(f"stopped the Prefect server at {s.ui_url} (pid {s.pid})" if s else f"no Prefect server runs for {h}",
              highlight=False)


@server_app.command()
def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Print the UI URL of the home's Prefect server; exit 1 when none runs."""
    from atelier import server as srv

    h = home_dir(home)
    s = srv.status(h)
    if as_json:
        _print_json(_describe(s, h) if s else {"running": False, "home": str(h)})
    elif s:
        out.print(f"running: UI {s.ui_url}  (API {s.api_url}, pid {s.pid}, since {s.started_at}, database under "
                  f"{s.prefect_home})", highlight=False, soft_wrap=True)
    else:
        out.print(f"not running for {h} (`atelier server start{_home_arg(home)}`, or any `atelier run`, starts it)",
                  highlight=False, soft_wrap=True)
    if s is None:
        raise typer.Exit(1)


def _home_arg(home: Optional[Path]) -> str:
    return f" --home {home}" if home else ""
