"""Shared pieces of the CLI: the Typer app, consoles, options and the one error exit path."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from atelier.settings import home_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, help="atelier: YAML briefs in, finished images with lineage out.")
out = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="atelier home (store, assets, models); default $ATELIER_HOME or ./.atelier")
StoreOpt = typer.Option(None, "--store", help="SQLAlchemy URL of the lineage store; default sqlite in the home")
AssetsOpt = typer.Option(None, "--assets", help="fsspec URL of the asset files (s3://bucket/path, file:///...); "
                         "default $ATELIER_ASSETS, else <home>/assets")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(message: str) -> None:
    from rich.markup import escape

    # escaped: a message quotes the user's keys and file names, and "[/x]" in one is not Rich markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    raise typer.Exit(2)


def _open(home: Optional[Path], store_url: Optional[str], assets_url: Optional[str] = None):
    """The store, or one error line naming the option (``--store`` / ``--assets``) and exit code 2."""
    from atelier.errors import StoreError
    from store import open_store

    h = home_dir(home)
    if not store_url and not (h / "lineage.db").exists():
        _fail(f"no lineage store at {h / 'lineage.db'} (run a brief first, or pass --home)")
    try:
        return open_store(h, store_url, assets_url)
    except StoreError as exc:
        _fail(str(exc))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Import Prefect and the flows (~160k objects the collector tracks) with the cyclic garbage collector off,
    then freeze what was imported: the collector's passes over those objects, during the import and at every
    later collection of the run, cost an unchanged re-run ~0.7 s of its ~3.4 s CPU (2 cores, loaded). Modules
    live as long as the process anyway."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()  # into the permanent generation: later collections skip them
        if was_enabled:
            gc.enable()
