"""`atelier models`: every model spec of every profile, and whether its weights are on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from atelier.cli.common import HomeOpt, JsonOpt, _print_json, app, out
from atelier.settings import home_dir, prepare_environment

ROLES = ("draft_model", "refine_model", "ip_adapter", "clip", "face", "upscale")


def model_rows(models_dir: Path) -> list[dict]:
    from atelier.profiles import PROFILES
    from atelier.sources import available

    rows, seen = [], {}
    for prof in PROFILES.values():
        for role in ROLES:
            spec = getattr(prof, role)
            if spec not in seen:
                seen[spec] = available(spec, models_dir)
            ok, where = seen[spec]
            rows.append({"profile": prof.name, "role": role.removesuffix("_model"), "name": spec.name,
                         "kind": spec.kind, "source": spec.source, "loras": [lo.source for lo in spec.loras],
                         "available": ok, "where": where})
    return rows


@app.command()
def models(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           profile: Optional[str] = typer.Option(None, "--profile", help="only this profile")) -> None:
    """List every profile's models and whether each is available locally."""
    h = home_dir(home)
    prepare_environment(h, offline_models=True)
    rows = [r for r in model_rows(h / "models") if profile in (None, r["profile"])]
    if as_json:
        return _print_json(rows)
    from atelier.profiles import PROFILES

    table = Table("profile", "role", "model", "source", "local", title="models (offline: nothing is downloaded)")
    hints: dict[str, str] = {}
    for r in rows:
        source = r["source"] + "".join(f" + {lo}" for lo in r["loras"])
        table.add_row(r["profile"], r["role"], r["name"], source, "[green]yes[/]" if r["available"] else "[red]no[/]")
        if not r["available"]:
            hints[r["name"]] = r["where"]
    out.print(table)
    for p in PROFILES.values():
        if profile in (None, p.name):
            out.print(f"[bold]{p.name}[/]: {p.description}")
    for name, hint in hints.items():
        out.print(f"[red]missing[/] {name}: {hint}", soft_wrap=True)
