"""`atelier assets` and `atelier diff`: queries across runs, and what differs between two recipes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from atelier.cli.common import HomeOpt, JsonOpt, StoreOpt, _fail, _open, _print_json, app, out

_AGE = re.compile(r"^(\d+)([mhdw])$")
_RATING = re.compile(r"^\s*(>=|<=|>|<|=|==)?\s*(\d+)\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-27``, ``2026-11-27T10:00`` (UTC unless it says otherwise) or an age: ``30m``, ``2h``, ``7d``, ``1w``.

    Returns naive UTC, as the store records times. Raises ValueError on anything else.
    """
    now = now or datetime.now(UTC).replace(tzinfo=None)
    if m := _AGE.match(text.strip()):
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    t = datetime.fromisoformat(text.strip())
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def parse_rating(text: str) -> tuple[str, int]:
    """``>=4``, ``<=2``, ``>3``, ``<3``, ``=5`` (or ``5``, ``==5``) → (operator, stars 1-5). ValueError otherwise."""
    m = _RATING.match(text)
    if m is None or not 1 <= int(m.group(2)) <= 5:
        raise ValueError(text)
    op = m.group(1) or "="
    return ("=" if op == "==" else op), int(m.group(2))


def rating_text(r: dict | None) -> str:
    """★4, ✗ (rejected), ★2 ✗ or "" for an asset's latest rating (``atelier.report.rating_dict``)."""
    if not r:
        return ""
    return " ".join(x for x in (f"★{r['stars']}" if r.get("stars") else "", "✗" if r.get("rejected") else "") if x)


@app.command()
def assets(
    campaign: Optional[str] = typer.Option(None, "--campaign", help="campaign name"),
    deliverable: Optional[str] = typer.Option(None, "--deliverable", help="deliverable name"),
    stage: Optional[str] = typer.Option(None, "--stage", help="reference, moodboard, draft, select, refine, ..."),
    model: Optional[str] = typer.Option(None, "--model", help="a model name in the asset's model identity"),
    seed: Optional[int] = typer.Option(None, "--seed", help="the recorded seed"),
    since: Optional[str] = typer.Option(None, "--since", help="made since: 2026-11-27[T10:00] (UTC) or 30m / 2h / 7d"),
    kept: Optional[bool] = typer.Option(None, "--kept/--not-kept", help="drafts a selection kept / never kept"),
    rating: Optional[str] = typer.Option(None, "--rating", help="latest rating: '>=4', '<3', '=5' (stars 1-5)"),
    rejected: Optional[bool] = typer.Option(None, "--rejected/--not-rejected",
                                            help="its latest rating rejects it / nothing rejects it"),
    limit: int = typer.Option(50, "--limit", min=1, help="at most this many, newest first"),
    home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Assets across all runs, newest first, filtered on their lineage and ratings (the latest rating counts)."""
    from atelier.report import asset_dict, model_name, rating_dict
    from store import queries

    # 1. Check inputs (before opening anything)
    if stage is not None and stage not in queries.STAGE_ORDER:
        _fail(f"--stage: unknown stage {stage!r}; known: {', '.join(queries.STAGE_ORDER)}")
    if kept is not None and stage not in (None, "draft"):
        _fail(f"--kept/--not-kept: only drafts are kept or not, got --stage {stage}")
    try:
        since_t = parse_since(since) if since is not None else None
    except ValueError:
        _fail(f"--since: expected a date (2026-11-27, 2026-11-27T10:00) or an age (30m, 2h, 7d), got {since!r}")
    try:
        rating_q = parse_rating(rating) if rating is not None else None
    except ValueError:
        _fail(f"--rating: expected a comparison and 1-5 stars like '>=4', '<=2', '>3', '<3' or '=5', got {rating!r}")
    # 2. Query
    st = _open(home, store_url)
    with st.sessions() as s:
        rows = queries.search_assets(s, campaign=campaign, deliverable=deliverable, stage=stage, model=model,
                                     seed=seed, since=since_t, kept=kept, rating=rating_q, rejected=rejected,
                                     limit=limit)
        kept_keys = queries.kept_drafts(s, [a.key for a in rows if a.stage == "draft"])
        ratings = queries.latest_ratings(s, [a.key for a in rows])
        found = [{**asset_dict(a), **({"kept": a.key in kept_keys} if a.stage == "draft" else {}),
                  **({"rating": rating_dict(ratings[a.key])} if a.key in ratings else {})} for a in rows]
    if as_json:
        return _print_json(found)
    # 3. Show
    table = Table(title=f"{len(found)} assets, newest first (times and all fields: --json)", box=box.SIMPLE_HEAD)
    for col in ("key", "stage", "size", "seed"):
        table.add_column(col, no_wrap=True)
    table.add_column("deliverable", overflow="fold")  # campaign/deliverable
    table.add_column("model", overflow="fold")
    for a in found:
        table.add_row(a["key"][:10], " ".join(x for x in (a["stage"], "✓" if a.get("kept") else "",
                                                           rating_text(a.get("rating"))) if x),
                      f"{a['width']}x{a['height']}" if a["width"] else "", str(a["params"].get("seed", "")),
                      escape(f"{a['campaign']}/{a['deliverable'] or '-'}"), escape(model_name(a["model"]) or ""))
    out.print(table)


@app.command()
def diff(
    a: str = typer.Argument(..., help="asset key, key prefix, or file"),
    b: str = typer.Argument(..., help="asset key, key prefix, or file"),
    home: Optional[Path] = HomeOpt, store_url: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """What differs between two assets' recipes: stage, size, parameters, model, parents."""
    from atelier.report import asset_dict, recipe_diff
    from store import queries

    st = _open(home, store_url)
    recipes = []
    with st.sessions() as s:
        for name, ref in (("A", a), ("B", b)):
            asset = resolve_asset(s, ref)
            if asset is None:
                _fail(f"{name}: {ref}: no asset with this key, key prefix or file content in {st.url}")
            recipes.append({**asset_dict(asset),
                            "parent_keys": [(p.key, e.role) for e, p in queries.parents(s, asset.key)]})
    ra, rb = recipes
    changes = recipe_diff(ra, rb)
    if as_json:
        return _print_json({"a": ra["key"], "b": rb["key"], "same": ra["key"] == rb["key"], "differences": changes})
    out.print(f"A {ra['key'][:10]} {ra['stage']} · {escape(ra['campaign'])}/{escape(ra['deliverable'] or '-')}\n"
              f"B {rb['key'][:10]} {rb['stage']} · {escape(rb['campaign'])}/{escape(rb['deliverable'] or '-')}",
              highlight=False)
    if ra["key"] == rb["key"]:
        out.print("same asset: same recipe")
        return
    table = Table("field", "A", "B", title=f"{len(changes)} differences")
    for field, (va, vb) in changes.items():
        table.add_row(escape(field), escape(_cell(va)), escape(_cell(vb)))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list) and all(isinstance(v, str) and len(v) == 32 for v in value):
        return ", ".join(v[:10] for v in value)  # parent keys
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:119] + "…"


def resolve_asset(session: Any, ref: str) -> Any:
    """An asset by key / prefix / file content, else by the lineage key a file carries (a signed delivery)."""
    from atelier import metadata
    from store import queries

    asset = queries.find_asset(session, ref)
    if asset is None and Path(ref).is_file() and (found := metadata.read_embedded(Path(ref))) is not None:
        asset = queries.find_asset(session, found.doc["key"])
    return asset
